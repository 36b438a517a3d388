"""Metrics for generated histology."""

"""mupad: multimodal pathology diffusion (image, text and RNA conditions on one SiT)."""

__version__ = "0.1.0"

"""The root of every exception mupad raises on purpose.

Library code raises a subclass of `MupadError` whose message says what is wrong, which
file or option it concerns, and how to fix it. The command line catches `MupadError` once
and prints that message as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MupadError(Exception):
    """A problem with the user's input, files or environment, explained in its message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised after the work was left in a resumable state; the message says so and
    how to resume. A KeyboardInterrupt (not a MupadError) so that `except Exception` lets it
    through like any other interruption; the command line exits with code 130."""

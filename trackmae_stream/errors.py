"""The one base class of the errors a user can act on.

A `UserError` says what is wrong with something the user gave or controls (a config key, a list line, a video, a
checkpoint, a folder, the disk) and names it. The command-line entry points print its message as one `error:` line
and exit non-zero, without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the input or the environment, with a message that names the file, key or step."""


__all__ = ["UserError"]

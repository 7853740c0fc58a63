"""Errors a user can act on.

Anything raised as `InputError` is a problem with what the user gave us (a path, a file, a task, a
dataset). The CLI prints its message as one line and exits non-zero; a traceback is reserved for bugs.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: the message names the offending file or value and what was expected."""


class ConfigError(InputError):
    """A task file or model folder that does not parse or validate."""

"""Errors a user causes (a file, a config key, a value) as opposed to bugs.

Each is raised where the problem is found, with a message that names the file, field or value. The command line
prints it as one line, ``spo <command>: error: <message>``, and exits with status 2 (``--debug`` shows the
traceback instead); any other exception is a bug and keeps its traceback. Each type also derives from the built-in
exception code written before it expects (``ValueError``, ``FileNotFoundError``, ``KeyError``, ``OSError``).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong; the message names it."""


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong."""


class DataError(UserError, ValueError):
    """A data set cannot be read or used: the message names the file (and line or row) or the data set."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder does not exist."""


class DataFieldError(DataError, KeyError):
    """A data set lacks a field the configuration names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(UserError, OSError):
    """A model, tokenizer or adapter cannot be found or read (a missing folder, a corrupt weights file, a hub name
    while offline)."""


class ModelError(UserError, ValueError):
    """A model, tokenizer or adapter loads but cannot be used as asked (an adapter of another base model)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message saying where the run stopped and how to go on."""

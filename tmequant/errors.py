"""Exceptions that the CLI turns into one clear line, never a traceback.

Every error a user can cause (a bad file, a bad option, a mismatched store) is a
``TmequantError``. Its ``str()`` is the one line shown: it names the file (when there is
one) and the problem, and says how to fix it where a fix exists.
"""

from __future__ import annotations

import os


class TmequantError(Exception):
    """Base class: a user-facing problem with a one-line message.

    ``path`` is the file the problem is about (or None); ``exit_code`` is what the CLI
    exits with when this error ends a command.
    """

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = None if path is None else str(path)
        # One line, whatever went into it (a class name or a file name may hold a newline).
        self.message = " ".join(str(message).splitlines())
        shown = self.path
        if shown is not None and shown != " ".join(shown.splitlines()):
            shown = repr(shown)
        super().__init__(f"{shown}: {self.message}" if shown else self.message)


class InputError(TmequantError):
    """A command-line input (slide list, manifest, option value) is malformed."""

    exit_code = 2


class SlideError(TmequantError):
    """A slide cannot be opened or read, or its pixel size is missing or implausible."""


class StoreError(TmequantError):
    """A slide store is missing, unfinished, or was made with other parameters."""


class ModelError(TmequantError):
    """A model folder, model card or checkpoint is invalid or incompatible."""


class ParamsError(TmequantError):
    """A parameters file has unknown keys or out-of-range values."""

    exit_code = 2


class CellTableError(TmequantError):
    """A cell table (GeoJSON, CSV, Parquet) is malformed, empty or out of bounds."""

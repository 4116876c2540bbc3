"""Errors that mean "the user asked for something we cannot do", shown as one line by the CLI."""


class DeepzipError(Exception):
    """A user-facing error: bad input, missing file, mismatched checkpoint.

    The CLI prints ``str(err)`` on one line and exits non-zero instead of a traceback.
    """


class DeepzipFormatError(DeepzipError, ValueError):
    """A file is not a valid .dzip (truncated, corrupted, hostile or another format)."""

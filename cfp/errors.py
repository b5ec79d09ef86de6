"""The one exception type users see: a clear, one-paragraph message."""


class CFPError(Exception):
    """A user-facing error. The CLI prints its message without a traceback."""

"""The one exception type users see: a clear, one-paragraph message."""


class CFPError(Exception):
    """A user-facing error. The CLI prints its message without a traceback."""


class CFPWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""

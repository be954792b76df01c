"""The one exception type caft raises for bad input: its message says what, where and how to fix."""


class CaftError(ValueError):
    """A user-facing error. The CLI prints its message without a traceback."""

"""One error type for bad user input: the CLI prints its message as one line and exits non-zero."""


class EmbedtuneError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""

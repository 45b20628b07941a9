"""The one exception type users see: its message is a single sentence saying what is wrong and what to do."""


class EgptError(Exception):
    """A user-facing error (bad input, missing file or package); the CLI prints it as one line and exits 2."""

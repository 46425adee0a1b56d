"""One exception type for bad user input, so the CLI can print it as a single clear line."""


class DataError(ValueError):
    """Bad input data or configuration; the message names the file (or key) and the problem."""

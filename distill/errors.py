"""The exceptions the CLI reports as one line: bad user input, and a command stopped by SIGTERM or Ctrl-C."""


class DataError(ValueError):
    """Bad input data or configuration; the message names the file (or key) and the problem."""


class Terminated(Exception):
    """A command stopped by SIGTERM or SIGINT (:mod:`distill.termination`); the CLI prints the message,
    which says what was interrupted, and exits 128 + the signal (143, or 130 for Ctrl-C). Raised without a message by the signal handler."""

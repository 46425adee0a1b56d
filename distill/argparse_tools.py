"""What the ``distill`` tools and the torch-free ``python -m distill.infer_onnx`` share: the parser and one-line errors.

Imports nothing beyond the standard library, :mod:`distill.errors` and :mod:`distill.termination`, so an entry point that
must not load PyTorch can use it.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from distill.errors import DataError, Terminated
from distill.termination import exit_status, stop_signal_name

OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class ToolParser(argparse.ArgumentParser):
    """argparse with whole option names only (``--size`` never matches ``--size-x``) and one-line errors."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str):
        sys.exit(f"error: {self.prog}: {message} (see `{self.prog} --help`)")


def data_error_in_chain(err: BaseException) -> DataError | None:
    """The :class:`DataError` behind ``err`` (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DataError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Exit with one ``error: ...`` line on a user mistake: a :class:`DataError` (also a wrapped one)
    or an output that cannot be written (full disk, read-only or forbidden folder); and with
    status 143 (SIGTERM) or 130 (Ctrl-C) after a :class:`Terminated` command. Any other exception is a bug and
    keeps its traceback."""
    try:
        yield
    except Terminated as err:
        print(f"error: {err or f'interrupted by {stop_signal_name()}'}", file=sys.stderr, flush=True)
        sys.exit(exit_status())
    except Exception as err:
        data_error = data_error_in_chain(err)
        if data_error is not None:
            sys.exit(f"error: {data_error}")
        if isinstance(err, OSError) and err.errno in OUTPUT_ERRNOS:
            sys.exit(f"error: {err.filename or ''}: {err.strerror}".replace("error: : ", "error: "))
        raise

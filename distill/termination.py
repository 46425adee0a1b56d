"""SIGTERM (what schedulers and ``timeout`` send) ends a training command with a non-zero exit, never silently.

Lightning's handling (the convention of its SLURM requeue support) is kept: while a trainer call
runs, its handler sets ``trainer.received_sigterm`` and the loops stop at the next batch by raising
``SIGTERMException``, and :class:`distill.callbacks.FitCompletion` then writes ``last.ckpt``. Two
gaps are closed: ``SIGTERMException`` is a ``SystemExit`` with status 0, and Lightning installs its
handler per trainer call and forgets the signal at the next one, so a signal that came between
calls (between fit and test, between a table's runs, in the last batch) was lost.

:func:`handle_sigterm` installs a handler for a whole command that remembers the signal (Lightning
chains it after its own while a trainer call runs) and, outside trainer calls, stops at once by
raising :class:`~distill.errors.Terminated`. :func:`stop_on_sigterm` turns a ``SIGTERMException``,
a bare ``Terminated`` or a remembered signal into a ``Terminated`` saying what was interrupted.
Standard library only: the CLI installs it before importing PyTorch.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distill.errors import Terminated

EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
_received = False


def _on_sigterm(signum: int, frame) -> None:
    global _received
    _received = True
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # no trainer call is running: stop here
        raise Terminated()


def received_sigterm() -> bool:
    """Whether SIGTERM came during the current command (:func:`handle_sigterm`)."""
    return _received


def is_sigterm(err: BaseException) -> bool:
    """Whether ``err`` is how SIGTERM stops code: :class:`Terminated` or Lightning's ``SIGTERMException``."""
    if isinstance(err, Terminated):
        return True
    if isinstance(err, SystemExit) and "lightning.pytorch" in sys.modules:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        return isinstance(err, SIGTERMException)
    return False


@contextmanager
def stop_on_sigterm(describe: Callable[[], str]) -> Iterator[None]:
    """Inside the block, SIGTERM ends it with ``Terminated(describe())``: when it stops the block, and
    when it came while the block ran without stopping it (then once the block is done). A
    ``Terminated`` that already says what it interrupted passes unchanged."""
    try:
        yield
    except BaseException as err:
        if not is_sigterm(err) or (isinstance(err, Terminated) and err.args):
            raise
        raise Terminated(describe()) from None
    if received_sigterm():
        raise Terminated(describe())


@contextmanager
def handle_sigterm(what: str) -> Iterator[None]:
    """For one command (``what``, e.g. "distill table"): SIGTERM is remembered and ends the command
    with :class:`Terminated` (see the module docstring); the previous handler is restored after."""
    global _received
    _received = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with stop_on_sigterm(lambda: f"{what}: interrupted by SIGTERM"):
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)

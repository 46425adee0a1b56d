"""A stop signal (SIGTERM from schedulers and ``timeout``, SIGINT from Ctrl-C) ends a training command
with a checkpoint at the interrupt, one line saying what stopped and a non-zero exit, never silently.

Lightning's handling of SIGTERM (the convention of its SLURM requeue support) is kept: while a trainer
call runs, its handler sets ``trainer.received_sigterm`` and the loops stop at the next batch by raising
``SIGTERMException``, and :class:`distill.callbacks.FitCompletion` then writes ``last.ckpt``. Three gaps
are closed: ``SIGTERMException`` is a ``SystemExit`` with status 0; Lightning installs its handler per
trainer call and forgets the signal at the next one, so a signal that came between calls (between fit
and test, between a table's runs, in the last batch) was lost; and Ctrl-C raised ``KeyboardInterrupt``,
which Lightning turns into exit 1 without a checkpoint.

:func:`handle_stop_signals` installs, for a whole command, a handler of both signals that remembers the
first one. SIGINT is passed on to the SIGTERM handler in force, so during a trainer call Lightning stops
at the next batch exactly as for SIGTERM; a second Ctrl-C raises ``KeyboardInterrupt`` at once. Outside
trainer calls it stops at once by raising :class:`~distill.errors.Terminated`. :func:`stop_on_signal`
turns a ``SIGTERMException``, a bare ``Terminated`` or a remembered signal into a ``Terminated`` saying
what was interrupted; the command exits with ``128 + signal`` (:func:`exit_status`: 143, 130 for Ctrl-C).
Standard library only: the CLI installs it before importing PyTorch.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distill.errors import Terminated

#: A ``distill`` command's exit status after SIGTERM, SIGINT: what a shell reports for a process they ended.
EXIT_STATUSES = (128 + signal.SIGTERM, 128 + signal.SIGINT)
_received: signal.Signals | None = None


def _on_stop_signal(signum: int, frame) -> None:
    global _received
    first = _received is None
    if first:
        _received = signal.Signals(signum)
    if signum == signal.SIGINT and not first:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
    if signal.getsignal(signal.SIGTERM) is _on_stop_signal:  # no trainer call is running: stop here
        raise Terminated()
    if signum == signal.SIGINT:  # a trainer call is running: Lightning's SIGTERM handling stops it at the next batch
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, frame)


def received_stop_signal() -> bool:
    """Whether SIGTERM or SIGINT came during the current command (:func:`handle_stop_signals`)."""
    return _received is not None


def stop_signal_name() -> str:
    """The stop signal received, for messages: "SIGTERM" or "SIGINT (Ctrl-C)"."""
    return "SIGINT (Ctrl-C)" if _received == signal.SIGINT else "SIGTERM"


def exit_status() -> int:
    """The exit status after the stop signal received: 128 + its number (143 SIGTERM, 130 SIGINT)."""
    return 128 + (_received or signal.SIGTERM)


def is_stop(err: BaseException) -> bool:
    """Whether ``err`` is how a stop signal stops code: :class:`Terminated` or Lightning's ``SIGTERMException``."""
    if isinstance(err, Terminated):
        return True
    if isinstance(err, SystemExit) and "lightning.pytorch" in sys.modules:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        return isinstance(err, SIGTERMException)
    return False


@contextmanager
def stop_on_signal(describe: Callable[[], str]) -> Iterator[None]:
    """Inside the block, a stop signal ends it with ``Terminated(describe())``: when it stops the block,
    and when it came while the block ran without stopping it (then once the block is done). A
    ``Terminated`` that already says what it interrupted passes unchanged."""
    try:
        yield
    except BaseException as err:
        if not is_stop(err) or (isinstance(err, Terminated) and err.args):
            raise
        raise Terminated(describe()) from None
    if received_stop_signal():
        raise Terminated(describe())


@contextmanager
def handle_stop_signals(what: str) -> Iterator[None]:
    """For one command (``what``, e.g. "distill table"): SIGTERM and SIGINT are remembered and end the
    command with :class:`Terminated` (see the module docstring); the previous handlers are restored after."""
    global _received
    _received = None
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with stop_on_signal(lambda: f"{what}: interrupted by {stop_signal_name()}"):
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

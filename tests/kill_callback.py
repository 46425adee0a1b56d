"""A callback for the resume and interruption tests: the process sends itself a signal (SIGKILL
unless told otherwise) at a given global step; ``SIGINT`` goes to its whole process group, data
loader workers included, as a terminal's Ctrl-C does.

It runs before the checkpoint callbacks (Lightning orders those last), so the step it dies at is
trained but not saved: the resumed run must redo it exactly.
"""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signum = signal.Signals[signal_name]

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            if self.signum == signal.SIGINT:
                os.killpg(os.getpgrp(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)

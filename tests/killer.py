"""Test hook, never imported by the package: `python -m tests.killer STEP km ARGS...` runs the `km` command
with a callback that SIGKILLs the process once training reaches step STEP (a kill at a known point)."""

from __future__ import annotations

import os
import signal
import sys

import pytorch_lightning as pl

import km.train
from km.cli import main


class SigkillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    step = int(sys.argv[1])
    make_trainer = km.train.make_trainer

    def with_kill(*args, **kwargs):
        trainer, grid = make_trainer(*args, **kwargs)
        trainer.callbacks.append(SigkillAt(step))
        return trainer, grid

    km.train.make_trainer = with_kill
    main(sys.argv[3:])

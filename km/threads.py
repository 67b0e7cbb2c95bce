"""torch's thread count for one piece of work, put back after it.

Decision: a run, a study or a bench script that sets `torch.set_num_threads` restores the caller's count on
return, so one piece of work in a notebook or a test process does not change the arithmetic (the last bits of
every sum) of the next. Measured: before this, bench/context_oracle.py left the pytest process at 1 thread and
the bit-exact kill-and-resume tests then compared 1-thread in-process runs with 2-thread subprocesses (CI,
stop 34). `tests/conftest.py` fails any test that leaves the count changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Run the body with `n` threads (None or 0: the current count); the caller's count is restored after it,
    whatever the body set in between."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)

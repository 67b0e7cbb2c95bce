"""`trainer.compile`: `torch.compile` of a model's training and evaluation step, eager where it fails.

What is compiled: `episode_elbo` (the bound of an episode: the whole forward pass of the training step,
and of the validation and test protocols) and `log_likelihood_is` (the test pass's importance sampling). The
optimiser step and Lightning's loop stay eager: the step is launch-bound on a GPU (docs/results/gpu/: bf16 was
not faster, compiling DKM took 87.0 -> 37.5 ms/step and K++ 33.9 -> 15.0 on an H200), so the kernels of the
model are where the time is.

Decisions, each from a measurement:
- Inductor's layout optimisation is switched off (`TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0` unless the
  environment sets it): on an H200 with torch 2.11 it made every model's compiled backward fail in
  `convolution_backward` (docs/results/gpu/h200_2026-12-01_layout_opt_on.txt); with it off all five compile.
- A failure of the compiler never stops a run: the call that fails is redone eagerly, and if the eager call
  succeeds the model runs eagerly from then on, with one warning line. If the eager call fails too, the error
  is the model's own (a non-finite memory, say) and is raised as it would be without compile.
- The first compiled training step is tried once, forward and backward, before it runs for real
  (`probe_backward`), so that a compile failure in the backward graph (the H200 failure above) falls back too,
  instead of stopping the run inside Lightning. It costs one extra step per process.
- On this project's 2-core CPU machines inductor takes 33 s to compile the tiny VAE's step (1 thread,
  2026-12-06), so the suite tests the wiring with `trainer.compile_backend=aot_eager` (dynamo + AOTAutograd,
  kernels eager): bit-identical losses to eager, 8 s for a tiny KM.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch


def disable_layout_optimization() -> None:
    """Inductor's layout optimisation off (see the module docstring), unless the environment chose."""
    os.environ.setdefault("TORCHINDUCTOR_LAYOUT_OPTIMIZATION", "0")
    if "torch._inductor.config" in sys.modules:  # already imported: the environment variable was read
        cfg = sys.modules["torch._inductor.config"]
        if hasattr(cfg, "layout_optimization"):
            cfg.layout_optimization = os.environ["TORCHINDUCTOR_LAYOUT_OPTIMIZATION"] == "1"


def known_backends() -> list[str]:
    """The torch.compile backends this torch knows (public `torch.compiler.list_backends`)."""
    return sorted(set(torch.compiler.list_backends(exclude_tags=())))


class CompiledOrEager:
    """`fn` through `torch.compile(fn, backend=...)`; eager from the first compiler failure on (one warning)."""

    def __init__(self, fn: Callable[..., Any], backend: str, what: str) -> None:
        self.fn = fn
        self.what = what
        self.backend = backend
        self.compiled: Callable[..., Any] | None = torch.compile(fn, backend=backend)

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def fall_back(self, e: BaseException) -> None:
        if self.compiled is None:
            return
        self.compiled = None
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(
            f"warning: torch.compile ({self.backend}) of {self.what} failed ({type(e).__name__}: {msg}); "
            "running eagerly from here",
            file=sys.stderr,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - decided below: eager succeeds -> a compiler failure
            out = self.fn(*args, **kwargs)  # raises the model's own error if the eager call fails too
            self.fall_back(e)
            return out


def probe_backward(step: CompiledOrEager, make_loss: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> None:
    """Run a compiled step's forward and backward once, gradients discarded, the random state restored (so the
    real step draws what an eager run draws): a compiler failure in the backward graph falls back to eager here
    (one warning) instead of stopping the run inside Lightning's backward. A separate pass, not the real step's
    graph kept alive: AOTAutograd donates the backward's buffers, so a retained graph cannot be run twice."""
    params = [p for p in params if p.requires_grad]
    if not step.active or not params:
        return
    devices = [params[0].device.index or 0] if params[0].is_cuda else []
    with torch.random.fork_rng(devices=devices):
        loss = make_loss()
        if not step.active or not loss.requires_grad:  # the forward itself fell back
            return
        try:
            torch.autograd.grad(loss, params, allow_unused=True)
        except Exception as e:  # noqa: BLE001 - any failure of the compiled backward: eager from here
            step.fall_back(e)

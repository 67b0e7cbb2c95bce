"""trainer.compile: the compiled step gives the eager losses, a compiler failure falls back to eager with one
warning, a bad backend is one line. The suite compiles with `aot_eager` (dynamo + AOTAutograd, eager kernels):
inductor takes ~33 s per model on these 2-core machines (km/compiling.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from km.cli import main
from km.compiling import CompiledOrEager, probe_backward
from km.config import compose_config
from km.runs import epoch_metrics
from km.train import train
from tests.conftest import needs_data, tiny


@needs_data
def test_compiled_run_gives_the_eager_losses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # KM: the memory algebra (Cholesky solves, the write) goes through dynamo too. Tolerance: 1e-5 relative,
    # float32 reassociation at most (measured: bit-identical with aot_eager, 2026-12-06).
    common = ["trainer.max_epochs=2", "eval.is_samples=2", "test_after_fit=false"]
    eager = Path(train(compose_config(tiny(tmp_path, *common, "run_id=eager", model="km")))["run_dir"])
    comp = Path(
        train(
            compose_config(
                tiny(
                    tmp_path,
                    *common,
                    "run_id=comp",
                    "trainer.compile=true",
                    "trainer.compile_backend=aot_eager",
                    model="km",
                )
            )
        )["run_dir"]
    )
    assert "torch.compile" not in capsys.readouterr().err  # no fallback: it really ran compiled
    for key in ("train/loss_epoch", "val/neg_elbo", "val/heldout"):
        a, b = epoch_metrics(eager, key), epoch_metrics(comp, key)
        assert a and a.keys() == b.keys(), key
        for ep in a:
            assert b[ep] == pytest.approx(a[ep], rel=1e-5), (key, ep)


def test_compiler_failure_falls_back_to_eager_once(capsys: pytest.CaptureFixture) -> None:
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    step = CompiledOrEager(fn, "eager", "f")

    def broken(*a, **k):
        raise RuntimeError("inductor could not lower aten.convolution_backward\nmore detail")

    step.compiled = broken
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(step(torch.ones(2)), torch.full((2,), 2.0))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile (eager) of f failed (RuntimeError: inductor could not lower") == 1
    assert len(err.strip().splitlines()) == 1 and not step.active


def test_a_models_own_error_is_not_taken_for_a_compiler_failure() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("non-positive-definite memory")

    step = CompiledOrEager(fn, "eager", "f")
    with pytest.raises(ValueError, match="non-positive-definite"):
        step(torch.ones(1))
    assert step.active  # eager failed too: the model's error, compile stays on


def test_a_failing_compiled_backward_falls_back(capsys: pytest.CaptureFixture) -> None:
    class BadBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("expected size 32==32, stride 256==1 at dim=1")

    w = torch.nn.Parameter(torch.ones(3))
    step = CompiledOrEager(lambda v: v.sum(), "eager", "g")
    step.compiled = lambda v: BadBackward.apply(v).sum()
    before = torch.get_rng_state()
    probe_backward(step, lambda: step(w * torch.rand(3)), [w])
    assert torch.equal(torch.get_rng_state(), before)  # the probe's draws are undone: the real step draws the same
    assert not step.active and w.grad is None
    assert "stride 256==1" in capsys.readouterr().err


@needs_data
def test_unknown_compile_backend_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", *tiny(tmp_path, "trainer.compile=true", "trainer.compile_backend=nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bad value for 'trainer.compile_backend': nope") and "inductor" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()

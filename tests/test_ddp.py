"""Multi-process training on CPU (DDP over gloo): one run dir, rank-0 logging, sharded episodes,
metrics reduced across ranks, and agreement with a single process at the same effective batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from km.config import compose_config
from km.evaluate import evaluate
from km.runs import epoch_metrics, read_meta, read_metrics
from km.train import train
from tests.conftest import needs_data, tiny

pytestmark = needs_data


def test_ddp_two_processes_matches_single_process(tmp_path: Path) -> None:
    common = tiny(tmp_path, "data.train_episodes_per_epoch=64", "data.val_episodes=64", "test_after_fit=false")
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("KM_RUN_ID", None)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "km.cli",
            "train",
            *common,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "data.batch_size=4",
            "run_id=ddp",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = tmp_path / "runs" / "default" / "ddp"
    assert sorted(d.name for d in ddp.parent.iterdir()) == ["ddp"]  # both ranks used one run dir
    assert read_meta(ddp)["status"] == "finished"

    # Logged once, from rank 0: one epoch-level validation row per epoch.
    val_rows = [r for r in read_metrics(ddp) if r.get("val/neg_elbo")]
    assert [int(r["epoch"]) for r in val_rows] == [0, 1]
    # Each rank saw half of the 64 episodes per epoch: 64 / (4 per rank x 2 ranks) = 8 steps per epoch.
    state = torch.load(ddp / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 16

    # The single process with the same effective batch (8 episodes) takes the same steps over the
    # same episodes; only the sampling noise differs, so the metrics agree within noise.
    single = Path(train(compose_config([*common, "data.batch_size=8", "run_id=single"]))["run_dir"])
    assert torch.load(single / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 16
    v_ddp, v_single = epoch_metrics(ddp, "val/neg_elbo"), epoch_metrics(single, "val/neg_elbo")
    for e in (0, 1):
        assert v_ddp[e] == pytest.approx(v_single[e], rel=0.03), (v_ddp, v_single)

    # Reduction across ranks: the final weights evaluated in one process on the same validation
    # episodes give the metric DDP logged (up to the bound's sampling noise).
    ev = evaluate(ddp, split="val", is_samples=0)
    assert ev["metrics"]["val/neg_elbo"] == pytest.approx(v_ddp[1], rel=0.01)

"""Issue #31 item 5: the Python API (km/api.py) and examples/api_tour.py, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import DATA_DIR, needs_data, tiny

ROOT = Path(__file__).resolve().parents[1]


def test_import_km_does_not_load_torch() -> None:
    code = "import sys, km; assert 'torch' not in sys.modules; km.compose; assert 'torch' in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@needs_data
def test_the_api_tour_example_runs(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "examples/api_tour.py", f"runs_dir={tmp_path}", f"data.data_dir={DATA_DIR}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert "memory: R (2, 64, 16), U (2, 64, 64)" in out and "L1 error of a read:" in out
    run_dir = Path(out.split("run ", 1)[1].split(":", 1)[0])
    assert (run_dir / "api_tour.png").is_file()
    ev = json.loads((run_dir / "eval.json").read_text())
    assert f"test/neg_elbo {ev['metrics']['test/neg_elbo']:.2f}" in out


@needs_data
def test_load_write_read_sample_evaluate_match_the_commands(tmp_path: Path) -> None:
    import km
    from km.evaluate import load_run

    run = km.fit(tiny(tmp_path, "trainer.max_epochs=1", "test_after_fit=false", "run_id=api", model="km"))
    assert run.run_dir == tmp_path / "runs" / "default" / "api" and run.has_memory and not run.model.training
    again = km.load(run.run_dir)
    _, _, ckpt, _, model = load_run(run.run_dir)
    assert again.checkpoint == ckpt  # the checkpoint km eval picks
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    x = run.episodes(3)
    assert x.shape == (3, 8, 1, 28, 28) and torch.equal(x, again.episodes(3))  # the fixed test episodes
    memory = run.write(x)
    assert memory.R.shape == (3, 64, 16)
    assert run.read(x, memory).shape == x.shape and run.sample(memory, 5).shape == (3, 5, 1, 28, 28)
    assert run.sample(None, 5, batch=2).shape == (2, 5, 1, 28, 28)
    metrics = run.evaluate(is_samples=0)["metrics"]
    assert json.loads((run.run_dir / "eval.json").read_text())["metrics"] == metrics
    vae = km.fit(tiny(tmp_path, "trainer.max_epochs=1", "test_after_fit=false", "run_id=vae"))
    assert not vae.has_memory and vae.write(x) is None and vae.read(x).shape == x.shape

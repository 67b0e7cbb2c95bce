"""bench/gpu.py (`make gpu-check`) runs on a CPU at tiny sizes and prints its table: ready for the day a GPU is there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GPU_PY = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_gpu_check_prints_the_table_at_tiny_sizes_on_cpu(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_PY)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    gpu.main(["--device", "cpu", "--tiny", "--steps", "1", "--compile", "off"])
    out = capsys.readouterr().out
    assert "device check: CPU" in out and "tiny sizes" in out
    for col in ("fp32 ms/step", "images/s", "peak MiB", "bf16 ms/step", "loss fp32", "loss bf16", "compiled ms/step"):
        assert col in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == list(gpu.MODEL_NAMES)
    for r in rows:  # finite losses in both precisions, their gap small at init
        cells = [c.strip() for c in r.split("│")[1:-1]]
        loss32, loss16, gap = float(cells[8]), float(cells[9]), float(cells[10])
        assert loss32 == loss32 and loss16 == loss16 and gap < 1e-2
    assert "torch.compile: skipped (--compile off)" in out
    assert "episode sampler" in out

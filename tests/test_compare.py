"""km compare on hand-written run directories (no training): tables, CSV round trip, plots, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from km.cli import main as km_main
from km.compare import aggregate, aggregate_curves, collect

UNIT = {"mnist": "nats/image", "cifar10": "bits/dim"}
# (model, data) -> per-seed test/neg_elbo; recon = 0.8 * neg_elbo, kl = the rest, nll_is20 = neg_elbo - 5
NEG_ELBO = {
    ("vae", "mnist"): [120.0, 118.5, 121.25],
    ("km", "mnist"): [110.0, 112.0],
    ("vae", "cifar10"): [4.51, 4.55],
    ("km", "cifar10"): [4.70],
}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _curve(final: float, seed: int, epochs: int = 4) -> list[float]:
    return [final * (1 + 0.5 / (e + 1)) + 0.1 * seed for e in range(epochs)]


def write_run(root: Path, model: str, data: str, seed: int, neg_elbo: float | None, status: str = "finished",
              curve: list[float] | None = None, episode_length: int = 32) -> Path:
    run_id = f"2026-{model}-{data}-s{seed}-{status}"
    d = root / f"{model}-{data}" / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"model:\n  name: {model}\n  lr: 0.001\ndata:\n  name: {data}\n  episode_length: {episode_length}\n"
        f"eval:\n  is_samples: 20\nname: {model}-{data}\nrun_id: {run_id}\nseed: {seed}\n")
    (d / "run.json").write_text(json.dumps({"status": status, "name": f"{model}-{data}", "run_id": run_id,
                                            "error": "loss is nan" if status == "failed" else None}))
    # CSVLogger layout: sparse rows, step rows with train/loss_step, epoch rows with val/* filled
    cols = ["epoch", "step", "train/loss_epoch", "train/loss_step", "val/kl", "val/neg_elbo", "val/recon"]
    lines = [",".join(cols)]
    for e, v in enumerate(curve or []):
        lines.append(f"{e},{10 * e + 5},,{v * 2},,,")
        lines.append(f"{e},{10 * e + 9},,,{0.2 * v},{v},{0.8 * v}")
        lines.append(f"{e},{10 * e + 9},{v * 1.5},,,,")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    if neg_elbo is not None:
        (d / "eval.json").write_text(json.dumps({
            "split": "test", "model": model, "data": data, "seed": seed, "unit": UNIT[data],
            "episode_length": episode_length, "episodes": 312, "is_samples": 20,
            "metrics": {"test/neg_elbo": neg_elbo, "test/recon": 0.8 * neg_elbo, "test/kl": 0.2 * neg_elbo,
                        "test/nll_is20": neg_elbo - 5},
        }))
    return d


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for (model, data), vals in NEG_ELBO.items():
        for seed, v in enumerate(vals, start=1):
            write_run(root, model, data, seed, v, curve=_curve(v, seed))
    write_run(root, "km", "mnist", 9, None, status="running", curve=_curve(111.0, 9, epochs=2))  # no eval.json
    write_run(root, "vae", "mnist", 7, 1e6, status="failed", curve=[1e6])  # must not count anywhere
    (root / "km-mnist" / "2026-km-mnist-s1-finished" / "wandb" / "run-x" / "files").mkdir(parents=True)
    (root / "km-mnist" / "2026-km-mnist-s1-finished" / "wandb" / "run-x" / "files" / "config.yaml").write_text("x: 1\n")
    return root


def _by_key(agg: dict) -> dict[tuple[str, str], dict]:
    return {(g["model"], g["data"]): g for g in agg["groups"]}


def test_collect_and_aggregate_numbers(runs: Path) -> None:
    rows = collect([runs])
    assert len(rows) == 10  # 8 evaluated + 1 without eval.json + 1 failed; the wandb/ config.yaml is no run
    agg = aggregate(rows)
    groups = _by_key(agg)
    assert set(groups) == set(NEG_ELBO)
    for key, vals in NEG_ELBO.items():
        g = groups[key]
        assert g["n"] == len(vals) and g["unit"] == UNIT[key[1]] and g["episode_length"] == 32
        assert g["is_samples"] == [20]
        s = g["metrics"]["test/neg_elbo"]
        assert s["mean"] == pytest.approx(_mean(vals)) and s["n"] == len(vals)
        if len(vals) > 1:
            assert s["std"] == pytest.approx(_std(vals))
        else:
            assert s["std"] is None  # undefined for one run
        assert g["metrics"]["test/nll_is20"]["mean"] == pytest.approx(_mean(vals) - 5)
        assert g["metrics"]["test/recon"]["mean"] == pytest.approx(0.8 * _mean(vals))
    # the failed run (1e6) is out; the running one without eval.json counted separately
    assert len(agg["failed"]) == 1 and len(agg["without_eval"]) == 1
    assert groups[("vae", "mnist")]["metrics"]["test/neg_elbo"]["n"] == 3
    # sorted by data set, then the main metric; best per data set marked
    assert [(g["data"], g["model"]) for g in agg["groups"]] == [
        ("cifar10", "vae"), ("cifar10", "km"), ("mnist", "km"), ("mnist", "vae")]
    assert [g["best"] for g in agg["groups"]] == [True, False, True, False]
    assert agg["columns"][:4] == ["test/neg_elbo", "test/nll_is20", "test/recon", "test/kl"]
    # --metric switches sort/best
    agg2 = aggregate(rows, metric="test/kl")
    assert [g["best"] for g in agg2["groups"]] == [True, False, True, False]


def test_curves_pool_seeds_and_include_runs_without_eval(runs: Path) -> None:
    curves = aggregate_curves([r for r in collect([runs]) if r["status"] != "failed"])
    km_mnist = {c["label"]: c for c in curves["mnist"]}["km"]
    assert km_mnist["epochs"] == [0, 1, 2, 3]
    assert km_mnist["n"] == [3, 3, 2, 2]  # seeds 1, 2 + the running seed-9 run for its 2 epochs
    vals0 = [_curve(110.0, 1)[0], _curve(112.0, 2)[0], _curve(111.0, 9)[0]]
    assert km_mnist["mean"][0] == pytest.approx(_mean(vals0))
    assert km_mnist["std"][0] == pytest.approx(_std(vals0))
    km_cifar = {c["label"]: c for c in curves["cifar10"]}["km"]
    assert km_cifar["std"] == [None] * 4


def _read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as f:
        return {(r["model"], r["data"]): r for r in csv.DictReader(f)}


def test_cli_parent_dir_writes_tables_and_pngs(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    km_main(["compare", str(runs), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| data | model |" in printed and "without test results" in printed and "failed run" in printed

    table = _read_csv(out / "table.csv")
    assert set(table) == set(NEG_ELBO)
    for key, vals in NEG_ELBO.items():
        r = table[key]
        assert float(r["test/neg_elbo mean"]) == pytest.approx(_mean(vals))
        assert int(r["n"]) == len(vals) and r["unit"] == UNIT[key[1]]
        assert r["episode_length"] == "32" and r["is_samples"] == "20"
        if len(vals) > 1:
            assert float(r["test/neg_elbo std"]) == pytest.approx(_std(vals))
        else:
            assert r["test/neg_elbo std"] == ""
        assert float(r["test/nll_is20 mean"]) == pytest.approx(_mean(vals) - 5)
    assert {k for k, r in table.items() if r["best"] == "1"} == {("km", "mnist"), ("vae", "cifar10")}

    md = (out / "table.md").read_text()
    km_line = next(line for line in md.splitlines() if line.startswith("| mnist | **km**"))
    assert f"**{_mean([110.0, 112.0]):.2f} ± {_std([110.0, 112.0]):.2f}**" in km_line
    vae_c = next(line for line in md.splitlines() if line.startswith("| cifar10 | **vae**"))
    assert f"{_mean([4.51, 4.55]):.3f} ± {_std([4.51, 4.55]):.3f}" in vae_c  # bits/dim: 3 decimals
    km_c = next(line for line in md.splitlines() if line.startswith("| cifar10 | km"))
    assert "4.700 ± -" in km_c
    assert "| mnist | vae |" in md

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["groups"]) == 4 and len(summary["run_rows"]) == 10

    import matplotlib.image as mpimg

    for name in ("curves_mnist.png", "curves_cifar10.png", "nll_bars.png"):
        p = out / name
        assert p.stat().st_size > 10_000, name
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400, (name, img.shape)
        assert img[..., :3].std() > 0.05, name  # not a blank canvas


def test_cli_glob_and_sweep_dir(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "glob"
    km_main(["compare", f"{runs}/*mnist", "--out", str(out)])
    assert set(_read_csv(out / "table.csv")) == {("vae", "mnist"), ("km", "mnist")}
    assert not (out / "curves_cifar10.png").exists() and (out / "curves_mnist.png").exists()

    sweep = tmp_path / "sweeps" / "s1"
    sweep.mkdir(parents=True)
    picked = sorted((runs / "vae-cifar10").iterdir())
    (sweep / "state.json").write_text(json.dumps({"runs": [{"run_dir": str(p), "status": "finished"} for p in picked]
                                                  + [{"run_dir": str(tmp_path / "not-started")}, {"id": 3}]}))
    capsys.readouterr()
    km_main(["compare", str(sweep)])  # one sweep dir: default output <sweep>/compare
    table = _read_csv(sweep / "compare" / "table.csv")
    assert set(table) == {("vae", "cifar10")} and table[("vae", "cifar10")]["n"] == "2"
    assert "wrote" in capsys.readouterr().out


def test_no_runs_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing", f"{tmp_path}/nothing*"):
        with pytest.raises(SystemExit) as e:
            km_main(["compare", str(target), "--out", str(tmp_path / "o")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_wandb_without_credentials_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(SystemExit) as e:
        km_main(["compare", "--wandb", "someone/kanerva-lab", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "credentials" in err and err.count("\n") == 1

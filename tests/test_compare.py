"""km compare on hand-written run directories (no training): tables, CSV round trip, plots, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from km.cli import main as km_main
from km.compare import DOC_BEGIN, DOC_END, aggregate, aggregate_curves, bar_label, classify, collect
from km.compare.render import VERDICT_HEAD, format_markdown

UNIT = {"mnist": "nats/image", "omniglot": "nats/image", "cifar10": "bits/dim"}
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


def write_run(
    root: Path,
    model: str,
    data: str,
    seed: int,
    neg_elbo: float | None,
    status: str = "finished",
    curve: list[float] | None = None,
    episode_length: int = 32,
    extra_metrics: dict | None = None,
    **eval_keys: object,
) -> Path:
    """A run directory as `km train` leaves it; `extra_metrics` join eval.json's metrics, `eval_keys` its
    top level (steps, train_seconds, heldout_targets, class_episodes)."""
    run_id = f"2026-{model}-{data}-s{seed}-{status}"
    d = root / f"{model}-{data}" / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"model:\n  name: {model}\n  lr: 0.001\ndata:\n  name: {data}\n  episode_length: {episode_length}\n"
        f"eval:\n  is_samples: 20\nname: {model}-{data}\nrun_id: {run_id}\nseed: {seed}\n"
    )
    (d / "run.json").write_text(
        json.dumps(
            {
                "status": status,
                "name": f"{model}-{data}",
                "run_id": run_id,
                "error": "loss is nan" if status == "failed" else None,
            }
        )
    )
    # CSVLogger layout: sparse rows, step rows with train/loss_step, epoch rows with val/* filled
    cols = ["epoch", "step", "train/loss_epoch", "train/loss_step", "val/kl", "val/neg_elbo", "val/recon"]
    lines = [",".join(cols)]
    for e, v in enumerate(curve or []):
        lines.append(f"{e},{10 * e + 5},,{v * 2},,,")
        lines.append(f"{e},{10 * e + 9},,,{0.2 * v},{v},{0.8 * v}")
        lines.append(f"{e},{10 * e + 9},{v * 1.5},,,,")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    if neg_elbo is not None:
        (d / "eval.json").write_text(
            json.dumps(
                {
                    "split": "test",
                    "model": model,
                    "data": data,
                    "seed": seed,
                    "unit": UNIT[data],
                    "episode_length": episode_length,
                    "episodes": 312,
                    "is_samples": 20,
                    "metrics": {
                        "test/neg_elbo": neg_elbo,
                        "test/recon": 0.8 * neg_elbo,
                        "test/kl": 0.2 * neg_elbo,
                        "test/nll_is20": neg_elbo - 5,
                        **(extra_metrics or {}),
                    },
                    **eval_keys,
                }
            )
        )
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
        ("cifar10", "vae"),
        ("cifar10", "km"),
        ("mnist", "km"),
        ("mnist", "vae"),
    ]
    assert [g["best"] for g in agg["groups"]] == [True, False, True, False]
    assert agg["columns"][:4] == ["test/neg_elbo", "test/nll_is20", "test/recon", "test/kl"]
    # --metric switches sort/best
    agg2 = aggregate(rows, metric="test/kl")
    assert [g["best"] for g in agg2["groups"]] == [True, False, True, False]


def test_curves_pool_seeds_and_include_runs_without_eval(runs: Path) -> None:
    curves = aggregate_curves([r for r in collect([runs]) if r.status != "failed"])
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

    for name in ("curves_mnist.png", "curves_cifar10.png", "metric_bars.png"):
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
    (sweep / "state.json").write_text(
        json.dumps(
            {
                "runs": [{"run_dir": str(p), "status": "finished"} for p in picked]
                + [{"run_dir": str(tmp_path / "not-started")}, {"id": 3}]
            }
        )
    )
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


def test_wandb_without_credentials_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(SystemExit) as e:
        km_main(["compare", "--wandb", "someone/kanerva-lab", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "credentials" in err and err.count("\n") == 1


# ---- protocol groups: joint / memory-conditional / held-out, iid (test/) and one-class (test_class/) episodes ----

HELDOUT_TARGETS = 4
MD_COLUMNS = [  # table.md's main columns, in order
    "test/neg_elbo",
    "test/nll_is20",
    "test/recon",
    "test/kl",
    "test/memory_conditional",
    "test/heldout",
    "test/heldout_nll_is20",
    "test_class/heldout",
    "test_class/heldout_nll_is20",
    "test_class/neg_elbo",
    "test_class/nll_is20",
    "test_class/recon",
    "test_class/kl",
    "test_class/memory_conditional",
]
GROUP_ORDER = [
    ("test", "joint"),
    ("test", "memory_conditional"),
    ("test", "heldout"),
    ("test_class", "heldout"),
    ("test_class", "joint"),
    ("test_class", "memory_conditional"),
]
# (model, seed) -> (test/neg_elbo, test_class/heldout): km wins the joint bound, vae the one-class held-out bound
PROTOCOL_RUNS = {
    ("km", 1): (110.0, 95.0),
    ("km", 2): (112.0, 96.0),
    ("vae", 1): (120.0, 90.0),
    ("vae", 2): (121.0, 91.0),
}


def _protocol_metrics(neg_elbo: float, class_heldout: float) -> dict[str, float]:
    """The three protocols on both episode kinds, KL parts included."""
    return {
        "test/kl_z": 0.15 * neg_elbo,
        "test/kl_M": 0.05 * neg_elbo,
        "test/memory_conditional": neg_elbo - 10,
        "test/heldout": neg_elbo + 3,
        "test/heldout_nll_is20": neg_elbo + 1,
        "test/heldout_recon": 0.9 * neg_elbo,
        "test/heldout_kl": 3.0,
        "test/heldout_kl_z": 2.0,
        "test_class/neg_elbo": neg_elbo - 20,
        "test_class/nll_is20": neg_elbo - 22,
        "test_class/recon": 80.0,
        "test_class/kl": 10.0,
        "test_class/kl_z": 9.0,
        "test_class/memory_conditional": neg_elbo - 30,
        "test_class/heldout": class_heldout,
        "test_class/heldout_nll_is20": class_heldout - 2,
        "test_class/heldout_kl": 1.0,
    }


def write_protocol_runs(root: Path, steps: dict[tuple[str, int], int] | None = None) -> Path:
    """mnist: km and vae (2 seeds each, every protocol, 512 steps unless `steps` says otherwise) and dkm
    (old-style eval.json: joint metrics only, no steps); cifar10: one vae run, joint metrics only."""
    for (model, seed), (neg_elbo, class_heldout) in PROTOCOL_RUNS.items():
        write_run(
            root,
            model,
            "mnist",
            seed,
            neg_elbo,
            extra_metrics=_protocol_metrics(neg_elbo, class_heldout),
            steps=(steps or {}).get((model, seed), 512),
            train_seconds=(60.0 if model == "km" else 30.0) + seed,
            heldout_targets=HELDOUT_TARGETS,
            class_episodes=True,
        )
    write_run(root, "dkm", "mnist", 1, 130.0)
    write_run(root, "vae", "cifar10", 1, 4.5)
    return root


def _md_lines(md: str) -> tuple[list[str], list[str], list[str]]:
    """(legend lines, table header cells, note lines) of a table.md."""
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| data | model |"))
    cells = [c.strip() for c in lines[head].strip("|").split("|")]
    legend = [line for line in lines[:head] if line.startswith("- ")]
    notes = [line for line in lines[head:] if line and not line.startswith("|")]
    return legend, cells, notes


def _group_sequence(columns: list[str]) -> list[tuple[str, str]]:
    """(split, protocol) per run of consecutive columns; a group appearing twice means a split group."""
    seq: list[tuple[str, str]] = []
    for c in columns:
        split, protocol, _ = classify(c)
        if not seq or seq[-1] != (split, protocol):
            seq.append((split, protocol))
    return seq


def test_table_md_groups_columns_by_protocol(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_protocol_runs(tmp_path / "runs")
    out = tmp_path / "report"
    km_main(["compare", str(root), "--out", str(out)])
    md = (out / "table.md").read_text()
    legend, cells, _ = _md_lines(md)
    assert cells == ["data", "model", "unit", "T", "IS", "n", "steps", "train s", *MD_COLUMNS, VERDICT_HEAD]
    assert _group_sequence(MD_COLUMNS) == GROUP_ORDER  # each protocol group contiguous, in this order
    assert legend == [
        "- iid episodes (test/), joint bound -ELBO/T (every KL, bounds ln p(X)/T): "
        "test/neg_elbo, test/nll_is20, test/recon, test/kl",
        "- iid episodes (test/), memory-conditional (KL(M) left out; NOT a bound on ln p(X); the K++/GPM protocol): "
        "test/memory_conditional",
        "- iid episodes (test/), held-out n=4 targets (bounds ln p(x_target | context)): "
        "test/heldout, test/heldout_nll_is20",
        "- one-class episodes (test_class/), held-out n=4 targets (bounds ln p(x_target | context)): "
        "test_class/heldout, test_class/heldout_nll_is20",
        "- one-class episodes (test_class/), joint bound -ELBO/T (every KL, bounds ln p(X)/T): "
        "test_class/neg_elbo, test_class/nll_is20, test_class/recon, test_class/kl",
        "- one-class episodes (test_class/), memory-conditional (KL(M) left out; NOT a bound on ln p(X); "
        "the K++/GPM protocol): test_class/memory_conditional",
    ]
    assert md.startswith("# test/neg_elbo: joint bound -ELBO/T (mean ± std")
    assert "| data | model |" in capsys.readouterr().out

    rows = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| mnist |")}
    km_cells = [c.strip() for c in rows["**km**"].strip("|").split("|")]
    assert km_cells[6:8] == ["512", "61.5"]  # steps, train s: means over seeds
    assert km_cells[cells.index("test_class/heldout")] == f"95.50 ± {_std([95.0, 96.0]):.2f}"
    assert km_cells[cells.index("test/neg_elbo")] == f"**111.00 ± {_std([110.0, 112.0]):.2f}**"
    dkm_cells = [c.strip() for c in rows["dkm"].strip("|").split("|")]
    assert dkm_cells[6:8] == ["", ""] and dkm_cells[cells.index("test/heldout")] == ""  # unknown: empty

    with open(out / "table.csv", newline="") as f:
        reader = csv.DictReader(f)
        csv_metrics = [h[: -len(" mean")] for h in reader.fieldnames if h.endswith(" mean")]
        table = {(r["model"], r["data"]): r for r in reader}
    assert {"test/kl_z", "test/kl_M", "test/heldout_kl_z", "test_class/heldout_kl"} <= set(csv_metrics)
    assert not {"test/kl_z", "test/heldout_recon", "test_class/heldout_kl"} & set(cells)  # parts: CSV only
    assert _group_sequence(csv_metrics) == GROUP_ORDER
    assert float(table[("km", "mnist")]["steps"]) == 512 and float(table[("vae", "mnist")]["train_seconds"]) == 31.5
    assert table[("km", "mnist")]["heldout_targets"] == "4" and table[("dkm", "mnist")]["steps"] == ""

    summary = json.loads((out / "summary.json").read_text())
    assert [(g["split"], g["protocol"]) for g in summary["column_groups"]] == GROUP_ORDER
    assert summary["column_groups"][2]["title"] == "held-out n=4 targets (bounds ln p(x_target | context))"
    assert summary["column_groups"][0]["core"] == MD_COLUMNS[:4]


def test_best_only_marked_for_equal_budgets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    same = collect([write_protocol_runs(tmp_path / "same")])
    agg = aggregate(same)  # km and vae 512 steps, dkm unknown: comparable where known
    assert [(g["data"], g["model"], g["best"]) for g in agg["groups"]] == [
        ("cifar10", "vae", True),
        ("mnist", "km", True),
        ("mnist", "vae", False),
        ("mnist", "dkm", False),
    ]
    assert agg["best_notes"] == []

    mixed = collect([write_protocol_runs(tmp_path / "mixed", steps={("km", 2): 256})])
    assert aggregate(mixed)["best_notes"] == [
        "no best marked for mnist: runs trained for different budgets (steps: km 256/512, vae 512, dkm ?)"
    ]

    root = write_protocol_runs(tmp_path / "runs", steps={("vae", 1): 256, ("vae", 2): 256})
    out = tmp_path / "report"
    km_main(["compare", str(root), "--out", str(out)])
    note = "no best marked for mnist: runs trained for different budgets (steps: km 512, vae 256, dkm ?)"
    assert note in capsys.readouterr().out
    md = (out / "table.md").read_text()
    _, _, notes = _md_lines(md)
    assert note in notes
    mnist_rows = [line for line in md.splitlines() if line.startswith("| mnist |")]
    assert len(mnist_rows) == 3 and not any("**" in line for line in mnist_rows)
    assert any(line.startswith("| cifar10 | **vae** |") for line in md.splitlines())  # other data set unaffected
    table = _read_csv(out / "table.csv")
    assert {k for k, r in table.items() if r["best"] == "1"} == {("vae", "cifar10")}
    assert note in json.loads((out / "summary.json").read_text())["notes"]


def test_metric_test_class_heldout_sorts_and_marks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = collect([write_protocol_runs(tmp_path / "runs")])
    agg = aggregate(rows, metric="test_class/heldout")
    mnist = [g for g in agg["groups"] if g["data"] == "mnist"]
    assert [(g["model"], g["best"]) for g in mnist] == [("vae", True), ("km", False), ("dkm", False)]
    assert agg["without_eval"] == []  # dkm and cifar10 have test/ results only: still evaluated, sorted last
    assert mnist[0]["metrics"]["test_class/heldout"]["mean"] == pytest.approx(90.5)

    out = tmp_path / "report"
    km_main(["compare", str(tmp_path / "runs"), "--metric", "test_class/heldout", "--out", str(out)])
    assert "6 run(s), 6 with test results, 4 group(s)" in capsys.readouterr().out
    md = (out / "table.md").read_text()
    assert md.startswith("# test_class/heldout: held-out bound -ELBO/target, one-class episodes")
    _, cells, _ = _md_lines(md)
    assert cells[8:] == [*MD_COLUMNS, VERDICT_HEAD]  # --metric does not reorder the columns
    vae = next(line for line in md.splitlines() if line.startswith("| mnist | **vae** |"))
    vae_cells = [c.strip() for c in vae.strip("|").split("|")]
    assert vae_cells[cells.index("test_class/heldout")] == f"**90.50 ± {_std([90.0, 91.0]):.2f}**"
    assert not vae_cells[cells.index("test/neg_elbo")].startswith("**")
    assert (out / "metric_bars.png").stat().st_size > 10_000


def test_doc_replaces_only_the_marked_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("km.compare._today", lambda: "2026-01-02")
    root = write_protocol_runs(tmp_path / "runs")
    docs = tmp_path / "docs"
    docs.mkdir()
    doc = docs / "RESULTS.md"
    before = "# Results\n\nHand-written analysis, kept.\n\n"
    after = "\n\n## Discussion\n\nHand-written text after the table, kept too.\n"
    doc.write_text(before + DOC_BEGIN + "\nstale table\n" + DOC_END + after)
    argv = ["compare", str(root), "--out", str(tmp_path / "o"), "--doc", str(doc)]
    km_main(argv)
    text = doc.read_text()
    assert text.startswith(before + DOC_BEGIN + "\n") and text.endswith("\n" + DOC_END + after)
    assert "stale table" not in text and text.count(DOC_BEGIN) == 1 and text.count(DOC_END) == 1
    block = text[len(before) : -len(after)]
    assert f"`km compare {root} --out {tmp_path / 'o'} --doc {doc}` (2026-01-02)" in block
    assert block.count("**mnist** (nats/image, sorted by test/neg_elbo)") == 1
    assert block.count("**cifar10** (bits/dim, sorted by test/neg_elbo)") == 1
    tables = [line for line in block.splitlines() if line.startswith("| model |")]
    assert len(tables) == 4  # one table per data set, and one of its terms
    assert block.count("**mnist, term by term**") == 1 and block.count("**cifar10, term by term**") == 1
    mnist_head = [c.strip() for c in tables[1].strip("|").split("|")]
    assert mnist_head == [
        "model",
        "n",
        "T",
        "IS",
        "steps",
        "train s",
        "joint -ELBO/T [nats/image]",
        "joint NLL IS20 [nats/image]",
        "joint recon [nats/image]",
        "joint KL [nats/image]",
        "mem-cond [nats/image]",
        "held-out -ELBO/target [nats/image]",
        "held-out NLL IS20 [nats/image]",
        "held-out (class) -ELBO/target [nats/image]",
        "held-out (class) NLL IS20 [nats/image]",
        VERDICT_HEAD,
    ]  # joint and memory-conditional on one-class episodes: table.csv only
    assert "joint -ELBO/T [bits/dim]" in tables[0] and "held-out" not in tables[0]  # cifar10: joint only
    assert "NOT a bound on ln p(X)" in block and "| **km** |" in block

    km_main(argv)  # idempotent
    assert doc.read_text() == text
    assert [p.name for p in docs.iterdir()] == ["RESULTS.md"]  # no temp file left behind


def test_doc_missing_file_no_markers_and_broken_markers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_protocol_runs(tmp_path / "runs")
    new = tmp_path / "docs" / "new.md"  # neither the file nor its directory exists
    argv = ["compare", str(root), "--metric", "test_class/heldout", "--out", str(tmp_path / "o"), "--doc", str(new)]
    km_main(argv)
    text = new.read_text()
    assert text.startswith(DOC_BEGIN + "\n") and text.endswith("\n" + DOC_END + "\n")
    assert f"`km compare {root} --metric test_class/heldout --out {tmp_path / 'o'} --doc {new}`" in text
    assert "| **vae** |" in text and "**mnist** (nats/image, sorted by test_class/heldout)" in text

    plain = tmp_path / "notes.md"
    plain.write_text("# Notes\n\nkeep me")  # no markers, no final newline
    km_main(["compare", str(root), "--out", str(tmp_path / "o"), "--doc", str(plain)])
    text = plain.read_text()
    assert text.startswith("# Notes\n\nkeep me\n\n" + DOC_BEGIN + "\n") and text.endswith(DOC_END + "\n")
    km_main(["compare", str(root), "--out", str(tmp_path / "o"), "--doc", str(plain)])
    assert plain.read_text() == text

    broken = tmp_path / "broken.md"
    broken.write_text(f"text\n{DOC_BEGIN}\nno end marker\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        km_main(["compare", str(root), "--out", str(tmp_path / "o2"), "--doc", str(broken)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and DOC_END in err and err.count("\n") == 1
    assert broken.read_text() == f"text\n{DOC_BEGIN}\nno end marker\n"
    assert not (tmp_path / "o2").exists()  # stopped before writing anything


def test_metric_names_classify_and_bar_labels() -> None:
    assert classify("test/neg_elbo") == ("test", "joint", "neg_elbo")
    assert classify("test/kl_M") == ("test", "joint", "kl_M")
    assert classify("test/nll_is20") == ("test", "joint", "nll_is20")
    assert classify("test/memory_conditional") == ("test", "memory_conditional", "score")
    assert classify("test_class/heldout") == ("test_class", "heldout", "neg_elbo")
    assert classify("test/heldout_kl_z") == ("test", "heldout", "kl_z")
    assert classify("test/heldout_nll_is100") == ("test", "heldout", "nll_is100")
    assert classify("val/something_else") == ("val", "other", "something_else")
    assert bar_label("test/neg_elbo", "nats/image") == "test/neg_elbo: joint bound -ELBO/T [nats/image]"
    assert bar_label("test_class/heldout", "bits/dim") == (
        "test_class/heldout: held-out bound -ELBO/target, one-class episodes [bits/dim]"
    )
    assert "not a bound" in bar_label("test/memory_conditional")
    assert "NLL" in bar_label("test/nll_is20") and "NLL" not in bar_label("test/heldout")


def test_runs_of_different_experiment_configs_are_not_pooled_and_budgets_come_from_metrics_csv(
    tmp_path: Path,
) -> None:
    """Two named experiment configs of one model (DKM on means and sampled) stay two rows labelled by their
    config; the budget is the steps trained (metrics.csv), the checkpoint step is the evaluated epoch's."""
    root = tmp_path / "runs"
    for exp, value, seed in (("cpu_dkm_mnist", 240.0, 1), ("cpu_dkm_sampled_mnist", 170.0, 2)):
        d = write_run(
            root, "dkm", "mnist", seed, value, curve=[value] * 4, epoch=0 if "sampled" not in exp else 3, steps=10
        )
        meta = json.loads((d / "run.json").read_text())
        (d / "run.json").write_text(json.dumps({**meta, "choices": {"experiment": exp}}))
    agg = aggregate(collect([root]))
    rows = {g["label"]: g for g in agg["groups"]}
    assert sorted(rows) == ["cpu_dkm", "cpu_dkm_sampled"]
    assert rows["cpu_dkm"]["n"] == rows["cpu_dkm_sampled"]["n"] == 1
    assert rows["cpu_dkm"]["steps"] == rows["cpu_dkm_sampled"]["steps"] == 40  # 4 epochs of metrics.csv, not eval.json
    assert rows["cpu_dkm"]["checkpoint_step"] == 10 and rows["cpu_dkm_sampled"]["checkpoint_step"] == 40
    assert rows["cpu_dkm_sampled"]["best"] and not rows["cpu_dkm"]["best"]  # same budget: best is marked


def test_better_only_beyond_two_pooled_std_with_three_seeds(tmp_path: Path) -> None:
    """The verdict column: 'better' needs n >= 3 seeds on both sides and a gap > 2 pooled std; else 'tie'."""
    from km.compare.aggregate import separated

    cases = {
        # data set: {model: values}; expected verdicts
        "mnist": ({"vae": [100.0, 101.0, 102.0], "km": [110.0, 111.0, 112.0]}, {"vae": "better", "km": "worse"}),
        "cifar10": ({"vae": [4.0, 4.3, 4.6], "km": [4.4, 4.5, 4.6]}, {"vae": "tie", "km": "tie"}),  # within spread
    }
    root = tmp_path / "runs"
    for data, (vals, _) in cases.items():
        for model, vs in vals.items():
            for seed, v in enumerate(vs, start=1):
                write_run(root, model, data, seed, v)
    agg = aggregate(collect([root]))
    got = {(g["data"], g["model"]): g["verdict"] for g in agg["groups"]}
    for data, (_, want) in cases.items():
        for model, v in want.items():
            assert got[(data, model)] == v, (data, model, got)
    # the rule itself, at its edges: a gap of exactly 2 pooled std is not beyond the spread
    a, b = {"mean": 0.0, "std": 1.0, "n": 3}, {"mean": 2.0, "std": 1.0, "n": 3}
    assert not separated(a, b) and separated(a, {**b, "mean": 2.01}) and not separated(a, {**b, "n": 2})
    md = format_markdown(agg)
    assert "vs lowest (2 pooled std, n >= 3)" in md
    assert next(x for x in md.splitlines() if x.startswith("| mnist | **vae**")).rstrip().endswith("| better |")


def test_budgets_are_not_pooled_and_a_budget_study_gets_its_figure(tmp_path: Path, capsys) -> None:
    """Runs of one config planned for different budgets (trainer.max_epochs) are separate groups, labelled with
    their budget, and km compare draws budget_<data>.png (one panel per protocol, steps on a log axis)."""
    from PIL import Image

    root = tmp_path / "runs"
    for epochs, steps, vals in ((10, 400, [150.0, 151.0, 149.0]), (30, 1200, [131.0, 132.0])):
        for seed, v in enumerate(vals, start=1):
            for model in ("vae", "km"):
                d = write_run(
                    root / f"e{epochs}", model, "mnist", seed, v + (model == "km"), steps=steps,
                    extra_metrics={"test/memory_conditional": v, "test/heldout": v + 2, "test_class/heldout": v + 1},
                )  # fmt: skip
                cfg = d / "config.yaml"
                cfg.write_text(cfg.read_text() + f"trainer:\n  max_epochs: {epochs}\n  max_steps: -1\n")
    agg = aggregate(collect([root]))
    groups = {(g["model"], g["steps_values"][0]): g for g in agg["groups"]}
    assert sorted(groups) == [("km", 400), ("km", 1200), ("vae", 400), ("vae", 1200)]
    assert groups[("vae", 400)]["n"] == 3 and groups[("vae", 1200)]["n"] == 2
    assert groups[("vae", 1200)]["metrics"]["test/neg_elbo"]["mean"] == pytest.approx(131.5)
    assert groups[("vae", 1200)]["label"].endswith("(30 epochs)")
    km_main(["compare", str(root), "--out", str(tmp_path / "out")])
    assert "budget_mnist.png" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "budget_mnist.png") as im:
        assert im.size[0] > 1000


def test_an_authors_score_gets_its_own_labelled_column_never_a_protocols(tmp_path: Path, capsys) -> None:
    """GPM's `test/authors_score` (its authors' objective and published figure, not a bound) is a main column of
    table.md and of the --doc table, under its own heading, and only for the data sets where a run reports it."""
    from km.evaluate import OTHER_LABEL, protocol_of

    assert classify("test/authors_score") == ("test", "authors", "score")
    assert classify("test_class/authors_score") == ("test_class", "authors", "score")
    assert protocol_of("test/authors_score") == OTHER_LABEL
    assert "not a bound" in bar_label("test/authors_score")
    root = tmp_path / "runs"
    for seed in (1, 2, 3):
        write_run(root, "gpm", "omniglot", seed, 260.0 + seed, extra_metrics={"test/authors_score": 180.0 + seed})
        write_run(root, "vae", "omniglot", seed, 146.0 + seed)
        write_run(root, "vae", "mnist", seed, 116.0 + seed)
    doc = tmp_path / "doc.md"
    km_main(["compare", str(root), "--out", str(tmp_path / "out"), "--doc", str(doc)])
    capsys.readouterr()
    md = (tmp_path / "out" / "table.md").read_text()
    assert "the authors' score, computed as their code computes its published figure (NOT a bound" in md
    head = next(line for line in md.splitlines() if line.startswith("| data |"))
    assert "test/authors_score" in [c.strip() for c in head.split("|")]
    gpm_row = next(line for line in md.splitlines() if "| gpm |" in line)
    assert "182.00 ± 1.00" in gpm_row  # the authors' column, mean ± std over the three seeds
    omniglot, mnist = doc.read_text().split("**omniglot**")[1], doc.read_text().split("**mnist**")[1].split("**")[0]
    assert "authors' score [nats/image]" in omniglot.split("\n\n")[1]
    assert "authors'" not in mnist  # no run of that data set reports one: no empty column

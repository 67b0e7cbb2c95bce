"""Issue #31, a researcher's day: `km train --help` answers which models there are and how to shorten a run;
`experiment=debug` runs train-evaluate-compare in seconds; a run's first line says where it is and how long."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from km.cli import main
from tests.conftest import DATA_DIR, needs_data

ROOT = Path(__file__).resolve().parents[1]


def test_train_help_lists_groups_choices_keys_and_km_config() -> None:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "km.cli", "train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    text = out.stdout
    for group, choice in (("model", "pkm"), ("data", "omniglot"), ("trainer", "gpu"), ("logger", "csv")):
        line = next(x for x in text.splitlines() if x.strip().startswith(group + " "))
        assert choice in line, line
    assert "experiment=debug" in text and "cpu_km_omniglot" in text and "paper_km_omniglot" in text
    assert "trainer.max_epochs=N" in text and "km config" in text
    assert time.time() - t0 < 10  # no torch behind --help


@needs_data
def test_debug_experiment_trains_evaluates_and_compares_in_seconds(tmp_path: Path, capsys) -> None:
    t0 = time.time()
    runs = tmp_path / "runs"
    main(["train", "experiment=debug", f"runs_dir={runs}", f"data.data_dir={DATA_DIR}"])
    err = capsys.readouterr().err
    first = err.strip().splitlines()[0]
    assert first.startswith(f"run {runs}/debug/") and "vae on mnist" in first
    assert "M parameters, 16 optimiser steps planned (2 epochs x 8)" in first
    main(["compare", str(runs / "debug"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "table.md").is_file()
    assert time.time() - t0 < 60


def test_missing_paths_and_folders_of_runs_are_named_before_torch_loads(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "ux" / name).mkdir(parents=True)
        (tmp_path / "ux" / name / "config.yaml").write_text("x: 1\n")
    cases = [
        (["eval", str(tmp_path / "nope")], "error: no such run directory or checkpoint"),
        (["train", f"resume={tmp_path / 'nope'}"], "error: cannot resume: no such run directory or checkpoint"),
        (["sample", str(tmp_path / "nope")], "error: no such run directory or checkpoint"),
        (["study", "capacity", str(tmp_path / "nope")], "error: no such run directory or checkpoint"),
        (["eval", str(tmp_path / "ux")], "is a folder of 2 runs, not a run: a, b"),
    ]
    code = "import sys, time; t = time.time(); from km.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
    code += "    print('torch' in sys.modules, round(time.time() - t, 2), file=sys.stderr)"
    for argv, says in cases:
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 2, (argv, p.stderr)
        err, tail = p.stderr.strip().splitlines()[0], p.stderr.strip().splitlines()[-1]
        assert says in err, (argv, err)
        torch_loaded, seconds = tail.split()
        assert torch_loaded == "False" and float(seconds) < 1.0, (argv, tail)


@needs_data
def test_pictures_say_what_whose_and_when(tmp_path: Path, capsys) -> None:
    """Every picture a run or a command writes carries its title (model, run, epoch and step) and one label a
    row, drawn on it and stored as the PNG's Title/Description text (read back here with PIL)."""
    from tests.conftest import png_text, tiny

    main(["train", *tiny(tmp_path, "trainer.max_epochs=1", "test_after_fit=false", "run_id=pic", model="km")])
    run_dir = tmp_path / "runs" / "default" / "pic"
    text = png_text(run_dir / "samples" / "epoch_000.png")
    assert text["Title"] == "KanervaMachine (km) | run default/pic | epoch 1, step 8 (validation episodes)"
    rows = text["Description"].splitlines()
    assert rows[:3] == [
        "episode 1: data",
        "episode 1: reconstruction from its memory",
        "episode 1: samples from its memory",
    ]
    main(["sample", str(run_dir), "--episodes", "2", "--iters", "2"])
    text = png_text(run_dir / "samples" / "conditional_iters2.png")
    assert text["Title"].startswith("KanervaMachine (km) | run default/pic | checkpoint of epoch 1, step 8 |")
    assert text["Description"].splitlines() == [
        "conditioning episode (written to memory)",
        "reconstruction from its memory",
        "one-shot samples from its memory",
        "samples after 1 read(s)",
        "samples after 2 read(s)",
        "samples from the prior memory",
    ]
    capsys.readouterr()
    main(["denoise", str(run_dir), "--episodes", "2", "--iters", "2", "--noise", "0.1"])
    out = capsys.readouterr().out
    text = png_text(run_dir / "denoise" / "noise0.1_iters2.png")
    assert "iterative reading of corrupted test items" in text["Title"]
    rows = text["Description"].splitlines()
    assert rows[0] == "stored episode (written to memory)" and rows[1].startswith("corrupted query (flipped 0.1): L1 ")
    assert [r.split(":")[0] for r in rows[2:]] == ["read 1", "read 2"]
    first_l1 = out.splitlines()[1].split()[1]  # the command's table and the picture's labels agree
    assert f"L1 {float(first_l1):.3f}" in rows[1]


def test_study_help_shows_that_studys_options_and_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "km.cli", "study", "oneshot", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "km study oneshot: write one-class episodes" in text
    for option in ("--T T items per one-class episode (default 15)", "--samples SAMPLES", "(default 32)"):
        assert option in text, option
    assert "--feedback" not in text and "--items" not in text  # other studies' options are not listed
    listing = subprocess.run(
        [sys.executable, "-m", "km.cli", "study", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert all(name in listing.stdout for name in ("capacity", "attractors", "oneshot", "addressing", "allocation"))

"""docs/results.md's generated tables and docs/results/table.md are what `km compare` makes from the run files
committed under docs/results/run_files/ (config.yaml, run.json, eval.json, metrics.csv of each reference run):
the page regenerates from the repository alone, without retraining. Cheap: it reads a few dozen small files."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from km.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"


def _block(text: str) -> list[str]:
    from km.compare import DOC_BEGIN, DOC_END

    body = text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0]
    return [x for x in body.splitlines() if not x.startswith("Regenerate with `")]


def _targets(argv: list[str]) -> list[str]:
    """The run-file folders a `km compare` argv reads (its positional arguments, not the options' values); each
    must be committed under docs/results/run_files/."""
    value_of = {"--by", "--out", "--metric", "--doc"}
    targets = [a for i, a in enumerate(argv[1:], 1) if not a.startswith("--") and argv[i - 1] not in value_of]
    assert targets and all(t.startswith("docs/results/run_files/") and (ROOT / t).is_dir() for t in targets), targets
    return targets


def _runnable(argv: list[str], out: Path) -> list[str]:
    """The argv with its run-file folders made absolute (the test runs from anywhere) and --out set to `out`."""
    targets = _targets(argv)
    args = [str(ROOT / a) if a in targets else a for a in argv]
    args[args.index("--out") + 1] = str(out)
    return args


def _assert_tables_match(out: Path, committed: Path) -> None:
    for name in ("table.md", "table.csv"):
        made = (out / name).read_text().replace(str(ROOT) + "/", "")
        assert made == (committed / name).read_text(), f"{committed.relative_to(ROOT)}/{name}"


def test_the_committed_tables_are_what_km_compare_makes_from_the_committed_run_files(tmp_path: Path, capsys) -> None:
    text = DOC.read_text()
    m = re.search(r"Regenerate with `(km compare [^`]+)`", text)
    assert m, "docs/results.md has no generated block"
    argv = shlex.split(m.group(1))[1:]
    doc = tmp_path / "results.md"
    shutil.copy(DOC, doc)
    out = tmp_path / "out"
    args = _runnable(argv, out)
    args[args.index("--doc") + 1] = str(doc)
    main(args)
    assert _block(doc.read_text()) == _block(text)
    _assert_tables_match(out, ROOT / "docs" / "results")


# The hand-written sections' generated tables: docs/results.md gives each one's `km compare` command on a line of
# its own; run from the committed run files it makes the committed table.md and table.csv exactly.
SECTIONS = ("docs/results/budget", "docs/results/ablation", "docs/results/ablation1200", "docs/results/fewshot")


def _section_commands(text: str) -> dict[str, list[str]]:
    cmds = {}
    for line in text.splitlines():
        if line.startswith("km compare ") and "--out" in line and "--doc" not in line:
            argv = shlex.split(line)[1:]
            cmds[argv[argv.index("--out") + 1]] = argv
    return cmds


@pytest.mark.parametrize("section", SECTIONS)
def test_each_sections_table_is_what_its_command_makes(section: str, tmp_path: Path, capsys) -> None:
    cmds = _section_commands(DOC.read_text())
    assert section in cmds, f"docs/results.md gives no one-line `km compare ... --out {section}` command"
    main(_runnable(cmds[section], tmp_path))
    capsys.readouterr()
    _assert_tables_match(tmp_path, ROOT / section)

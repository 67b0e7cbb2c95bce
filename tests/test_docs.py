"""The documents' pictures and files exist: every markdown image and relative link in README.md and docs/*.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # ![alt](path) and [text](path)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_picture_and_relative_link_of_a_document_exists(doc: Path) -> None:
    targets = [t.split("#")[0] for t in LINK.findall(doc.read_text())]
    local = [t for t in targets if t and not re.match(r"[a-z]+:", t)]  # not http(s):, mailto:
    missing = [t for t in local if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"
    if doc.name == "results.md":  # the studies' figures are what a reader looks at
        assert sum(t.endswith(".png") for t in local) >= 5


def _readme_commands() -> list[str]:
    """Every `km ...` line of the README's bash blocks, comments cut."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if line.startswith("km "):
                lines.append(line)
    return lines


def test_every_km_command_the_readme_shows_parses_and_its_config_composes() -> None:
    """Placeholders (<run-id>, RUN..., $D) become plain words and [optional] groups are kept; each command
    must parse with km's own parser, and each `km train` / `km config` override list must compose."""
    from km.cli import build_parser
    from km.config import compose_config

    commands = _readme_commands()
    assert len(commands) >= 20 and any(c.startswith("km study") for c in commands)
    parser = build_parser()
    for line in commands:
        words = line.replace("[", "").replace("]", "").replace("...", "").replace("$", "").split()[1:]
        words = [w for w in words if w]
        if words == ["train", "--help"]:
            continue
        try:
            args = parser.parse_args(words)
        except SystemExit as e:
            raise AssertionError(f"README command does not parse: {line}") from e
        if words[0] in ("train", "config"):
            keep = [w for w in args.overrides if "<" not in w and not w.startswith(("resume=", "init_from="))]
            compose_config(keep)  # raises ConfigError (one line) on an unknown key or choice

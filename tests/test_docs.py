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

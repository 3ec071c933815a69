"""The documentation's relative links point at files that exist (README is an index into docs/)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_readme_links_every_document():
    readme = (REPO / "README.md").read_text()
    for doc in DOCS[1:]:
        assert str(doc.relative_to(REPO)) in readme, f"README does not link {doc.relative_to(REPO)}"

"""The README is a short quickstart whose test command is CI's, and no relative link in the docs is broken."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and [text](target "title"); images too. Code spans and fenced blocks are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def relative_links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    links = [m.group(1) for m in LINK.finditer(text)]
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", link, re.I)]


def test_docs_pages_exist_and_readme_links_them():
    names = {p.name for p in PAGES}
    assert {"models-and-data.md", "training.md", "fast-path.md", "memory.md", "benchmarks.md", "multi-gpu.md",
            "evaluation.md"} <= names
    linked = {Path(link.split("#")[0]).name for link in relative_links(ROOT / "README.md")}
    assert names - {"README.md"} <= linked, "every docs/ page is linked from the README"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for link in relative_links(page):
            target = (page.parent / link.split("#")[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
    assert not broken, broken
    assert sum(len(relative_links(p)) for p in PAGES) > 30  # the pattern does find links


def test_readme_is_short_and_has_ci_test_command_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 150
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = next(line for line in ci if "python -m pytest" in line and not line.startswith("#"))
    assert command.strip() in readme.splitlines()


def test_evaluation_page_keeps_the_recipe_placeholder_section():
    assert "## Recipe results" in (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")

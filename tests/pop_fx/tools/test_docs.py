"""README and docs/ against the code: the PopConfig table, the command line, every path and link they cite."""

import dataclasses
import re
from pathlib import Path

import pytest

from pop_fx import PopConfig
from pop_fx.lowbit import PROXIES
from pop_fx.tools import cli, costmodel

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_read_in_five_minutes():
    assert len(README.read_text().splitlines()) <= 250


def test_popconfig_table_lists_every_field_and_every_proxy():
    text = README.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    assert set(rows) >= {f.name for f in dataclasses.fields(PopConfig)}
    for proxy in PROXIES:
        assert f'"{proxy}"' in rows["candidate_proxy"]


def test_command_line_lists_every_subcommand():
    line = re.search(r"`pop-fx \{([a-z,]+)\}`", README.read_text())
    assert line and set(line.group(1).split(",")) == set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_cited_file_exists(page):
    # Paths in backticks that name a file of the repository (pop_fx/…, passes/…, examples/…, tests/…, docs/…).
    cited = re.findall(r"`((?:pop_fx|passes|examples|tests|docs)/[\w./-]+\.(?:py|md|sh|png|txt))(?:::\w+)?`",
                       page.read_text())
    missing = [c for c in cited if not (ROOT / c).exists()]
    assert missing == []


def _anchors(page: Path) -> set[str]:
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert broken == []


def test_the_inspect_pointer_names_a_section_that_exists():
    assert "docs/design.md" in costmodel.PAPER_NOTE and '"Cost model"' in costmodel.PAPER_NOTE
    assert "cost-model" in _anchors(ROOT / "docs" / "design.md")

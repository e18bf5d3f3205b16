"""The README's links: every relative link names a file of the project and, for a page of
docs/, a heading it has (mkdocs build --strict checks the links inside docs/ the same way)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)")


def heading_ids(markdown: str) -> set[str]:
    """The anchors mkdocs gives a page's headings (its default toc slugs): lower case,
    punctuation dropped, spaces to hyphens."""
    ids = set()
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.M):
        text = re.sub(r"[`*_]", "", title).lower()
        text = re.sub(r"[^\w\s-]", "", text)
        ids.add(re.sub(r"[\s]+", "-", text.strip()))
    return ids


def readme_links() -> list[tuple[str, str | None]]:
    text = (ROOT / "README.md").read_text()
    return [(path, anchor) for path, anchor in LINK.findall(text) if "://" not in path]


def test_the_readme_links_into_docs():
    assert len(readme_links()) >= 10
    assert {path for path, _ in readme_links()} >= {"docs/index.md", "docs/flags.md"}


@pytest.mark.parametrize(("path", "anchor"), readme_links())
def test_a_readme_link_resolves(path, anchor):
    target = ROOT / path
    assert target.is_file(), path
    if anchor:
        assert anchor in heading_ids(target.read_text()), f"{path}#{anchor}"


def test_heading_ids_are_mkdocs_slugs():
    page = "# Deploying\n## TFLite models\n### `label-image`, the client\n"
    assert heading_ids(page) == {"deploying", "tflite-models", "label-image-the-client"}


def test_the_design_page_names_every_module():
    """docs/design.md's table of packages stays the map of the code: each module is named in
    its package's row."""
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in (ROOT / "docs" / "design.md").read_text().splitlines()
        if line.startswith("| `retrain/")
    }
    for path in sorted((ROOT / "retrain").glob("*/*.py")):
        if path.name != "__init__.py":
            row = rows.get(f"retrain/{path.parent.name}/", "")
            assert f"`{path.name}`" in row, f"docs/design.md: {path.relative_to(ROOT)}"

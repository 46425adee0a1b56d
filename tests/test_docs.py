"""The README (a newcomer's first ten minutes) and the documentation site (docs/, mkdocs.yml) stay in step.

``make test`` builds the site with ``mkdocs build --strict``, which fails on a broken link or anchor
inside docs/ and on an API page whose package no longer resolves. These checks cover what that
build does not read: the README, its links into docs/, and examples that other tests run.
"""

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"


def markdown_slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (MkDocs) gives a heading."""
    text = re.sub(r"[^\w\s-]", "", re.sub(r"[`*]", "", heading)).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (runs of hyphens are kept)."""
    text = re.sub(r"[^\w\s-]", "", re.sub(r"[`*]", "", heading)).strip().lower()
    return re.sub(r"\s", "-", text)


def headings(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # no '#' comments of code blocks
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def test_readme_is_short():
    assert len(README.splitlines()) < 200


def test_readme_keeps_the_two_commands():
    demo = "make demo   # synthetic 6-site prostate MRI (real NIfTI layout) -> teacher -> students -> results table"
    test = "make test   # lint (ruff check + ruff format --check), then the test suite (what CI runs: .ci/run)"
    assert demo in README and test in README
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "distill demo prostate" in makefile


def test_readme_links_reach_docs_pages_and_their_headings():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        target, _, anchor = link.partition("#")
        path = REPO / target
        assert path.is_file(), f"README links to {link}: no such file"
        if anchor:  # the same anchor on GitHub and on the site
            found = [h for h in headings(path) if markdown_slug(h) == anchor]
            assert found, f"README links to {link}: no such heading in {target}"
            assert github_slug(found[0]) == anchor, f"{link}: GitHub names that heading {github_slug(found[0])}"


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in nav_pages(value)]
    return [page for item in node for page in nav_pages(item)]


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = nav_pages(config["nav"])
    pages = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    assert sorted(nav) == pages


def test_every_readme_page_link_is_in_the_site():
    linked = {link.split("#")[0] for link in re.findall(r"\]\((docs/[^)\s]+)\)", README)}
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert linked <= {f"docs/{page}" for page in nav_pages(config["nav"])}


def test_readme_demo_numbers_are_the_results_pages():
    """The README's abridged demo table: every number is in the Results page's table of the same demo."""
    results = (DOCS / "results.md").read_text()
    section = results.split("## Prostate procedure 1: the demo", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in README.split("## What the demo prints", 1)[1].splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # the header and three models
    for row in rows[1:]:
        model = row.split("|")[1].strip()
        (full,) = [line for line in section.splitlines() if line.startswith(f"| {model} |")]
        for number in re.findall(r"\d+\.\d+", row):
            assert number in full, f"README demo row {model!r}: {number} is not in docs/results.md"


def test_results_sections_name_their_command_and_date():
    """Every table on the Results page sits in a section that gives its command and when it was recorded."""
    results = (DOCS / "results.md").read_text()
    sections = re.split(r"^#{2,3} ", results, flags=re.M)[1:]
    with_tables = [section for section in sections if re.search(r"^\|---", section, flags=re.M)]
    assert len(with_tables) >= 11  # the tables this page had when it was written: fewer means one was lost
    for section in with_tables:
        title = section.splitlines()[0]
        dated = re.findall(r"In the README since \d{4}-\d{2}-\d{2}", section)
        assert len(dated) >= 1, f"results section {title!r}: a table without its date"
        command = re.search(r"(distill \w|benchmarks/|make demo|bench_\w+\.py)", section)
        assert command, f"results section {title!r}: a table without the command that printed it"


def test_the_zonal_example_in_the_docs_is_the_one_the_layout_tests_run():
    """docs/own-data.md shows what tests/test_layouts.py's ZONAL_TWO_CHANNEL runs (plus where the data is)."""
    tree = ast.parse((REPO / "tests/test_layouts.py").read_text())
    (tested,) = [
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ZONAL_TWO_CHANNEL" for t in node.targets)
    ]
    blocks = re.findall(r"^```yaml\n(.*?)^```", (DOCS / "own-data.md").read_text(), flags=re.M | re.S)
    (shown,) = [yaml.safe_load(block) for block in blocks if "labels:" in block]
    tested = yaml.safe_load(tested)
    for section, keys in tested.items():
        for key, value in keys["init_args"].items():
            assert shown[section]["init_args"][key] == value, f"{section}.init_args.{key}"

"""The documents' figures are the code's: the reliability table names tests that exist, and the README's count
is the table's."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELIABILITY = REPO / "tests" / "RELIABILITY.md"  # maintainers' material: beside the tests


def _reliability_rows() -> list[list[str]]:
    """The rows of the table under "## The cases" (not its header and separator lines)."""
    text = RELIABILITY.read_text()
    rows = []
    for line in text.split("## The cases", 1)[1].splitlines():
        if line.startswith("| ") and not line.startswith(("| area ", "| --- ")):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_every_row_of_the_reliability_table_names_a_test_that_exists():
    rows = _reliability_rows()
    assert len(rows) > 300
    for cells in rows:
        assert len(cells) == 4, cells
        path, name = cells[3].strip("`").split("::")
        text = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(name)}\(", text, re.M), f"{cells[3]}: no such test"


def test_the_readme_and_the_summary_state_the_tables_count():
    rows = _reliability_rows()
    count = re.search(r"\*\*Reliability:\*\* (\d+) bad inputs and faults", (REPO / "README.md").read_text())
    assert count is not None, "the README's reliability line is missing"
    assert int(count.group(1)) == len(rows)
    summary = RELIABILITY.read_text().split("## The cases", 1)[0]
    per_area = {a: int(n) for a, n in re.findall(r"^\| ([^|]+?) \| (\d+) \|$", summary, re.M)}
    assert per_area == {a: sum(r[0] == a for r in rows) for a in per_area} and sum(per_area.values()) == len(rows)


def test_every_test_a_document_names_exists():
    """docs/*.md, the README and the reliability table cite tests as `tests/path.py::test_name`: each must be a test of that file."""
    cited = 0
    for doc in [REPO / "README.md", RELIABILITY, *sorted((REPO / "docs").glob("*.md"))]:
        for path, name in re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", doc.read_text()):
            cited += 1
            assert (REPO / path).is_file(), f"{doc.name}: {path} does not exist"
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{doc.name}: {path}::{name}"
    assert cited > 400

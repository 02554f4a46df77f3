"""``data/results/index.csv`` lists every results file, and only files that exist.

A result that is not in the index cannot be told current from superseded; regenerate the
index with ``python benchmarks/results_index.py`` after adding a result.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "data" / "results"


def _index() -> list[dict[str, str]]:
    with open(RESULTS / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _generator():
    spec = importlib.util.spec_from_file_location("results_index", REPO / "benchmarks" / "results_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_results_file_is_listed_once_and_exists() -> None:
    rows = _index()
    listed = [r["file"].rstrip("/") for r in rows]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    present = {p.name for p in _generator().entries()}
    assert set(listed) == present, (
        f"missing from the index: {sorted(present - set(listed))}; listed but absent: "
        f"{sorted(set(listed) - present)} -- run python benchmarks/results_index.py")


def test_every_row_says_what_it_shows_and_whether_it_is_current() -> None:
    gen = _generator()
    for r in _index():
        assert list(r) == gen.COLUMNS
        assert r["status"] in ("current", "superseded"), r
        assert r["shows"] and r["kind"], r


def test_a_file_cited_by_the_docs_is_current() -> None:
    rows = {r["file"]: r for r in _index()}
    assert rows["ownership-side-by-side.jsonl"]["status"] == "current"  # cited by docs/results.md
    assert rows["speed-by-loss.txt"]["status"] == "current"

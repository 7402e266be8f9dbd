"""bench_vs_vllm.py --recalibrate rewrites a run's generated tables and keeps the notes a person
wrote below them (an earlier version erased them)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench(request):
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling vllm_side
    request.addfinalizer(lambda: sys.path.remove(str(BENCHMARKS)))
    return importlib.import_module("bench_vs_vllm")


def _payload() -> dict:
    return {"workload": "w", "command": "c", "commit": "abc", "cpu": "cpu",
            "machine": {"platform": "p"}, "matched": {"block_size": 32}}


def test_generated_md_ends_with_the_marker_and_keeps_notes(bench, tmp_path):
    md = tmp_path / "run.md"
    md.write_text(bench.markdown(_payload(), []) + "\n## Reading\n\nwritten by hand\n")
    notes = bench.kept_notes(md)
    assert notes == "\n\n## Reading\n\nwritten by hand\n"
    rewritten = bench.markdown({**_payload(), "commit": "def"}, [], notes)
    assert "infercept commit def" in rewritten
    assert rewritten.endswith(bench.NOTES_MARKER + notes)


def test_md_without_marker_is_refused_not_erased(bench, tmp_path):
    md = tmp_path / "run.md"
    md.write_text("# old tables\n\n## Reading\n\nwritten by hand\n")
    with pytest.raises(SystemExit, match="no line"):
        bench.kept_notes(md)
    assert "written by hand" in md.read_text()
    assert bench.kept_notes(tmp_path / "absent.md") == ""

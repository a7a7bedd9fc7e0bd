"""scripts/plot_benchmarks.py draws one PNG per committed docs/bench_*.json (a new JSON without a plotter, or one whose
keys a plotter no longer reads, fails here), and docs/benchmarks.md shows every docs/plots/*.png that exists and
links none that does not."""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCRIPTS = str(ROOT / "scripts")


def _plots():
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    import plot_benchmarks

    return plot_benchmarks


def test_one_png_per_benchmark_json(tmp_path):
    plots = _plots()
    stems = sorted(p.stem for p in DOCS.glob("bench_*.json"))
    assert stems, "no docs/bench_*.json"
    written = plots.plot_all(DOCS, out_dir=tmp_path)
    assert sorted(p.name for p in written) == [f"{s}.png" for s in stems]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{s}.png" for s in stems]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, path


def test_json_without_a_plotter_is_named(tmp_path):
    plots = _plots()
    (tmp_path / "bench_new.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="bench_new"):
        plots.plot_all(tmp_path, out_dir=tmp_path / "plots")
    with pytest.raises(ValueError, match="bench_absent"):
        plots.plot_all(DOCS, only=["bench_absent"], out_dir=tmp_path / "plots")


def test_benchmarks_md_links_every_plot():
    linked = set(re.findall(r"!\[[^\]]*\]\(plots/([^)\s]+\.png)\)", (DOCS / "benchmarks.md").read_text()))
    present = {p.name for p in (DOCS / "plots").glob("*.png")}
    assert present, "no docs/plots/*.png: run scripts/plot_benchmarks.py"
    assert linked - present == set(), "linked in docs/benchmarks.md but not in docs/plots/"
    assert present - linked == set(), "in docs/plots/ but not shown in docs/benchmarks.md"
    assert present == {f"{p.stem}.png" for p in DOCS.glob("bench_*.json")}, "docs/plots/ is not one PNG per JSON"

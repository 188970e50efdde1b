"""``tensorstream trace-plot`` (tensorstream/trace_plot.py): lanes, totals, a PNG, and clear errors."""

from __future__ import annotations

import json
import sys

import pytest

from tensorstream import cli
from tensorstream.trace import build_chrome_trace
from tensorstream.trace_plot import plot_trace, trace_lanes, trace_totals

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EVENTS = [
    ("read", 0, 0, 0, 4096, 1_000_000, 2_000_000, "io", 0),
    ("read", 0, 1, 0, 2048, 1_000_000, 2_500_000, "io", 1),
    ("verify", 0, 0, 0, 4096, 2_000_000, 2_100_000, "worker", 0),
    ("verify", 0, 1, 0, 2048, 2_500_000, 2_600_000, "worker", 1),
    ("decompress", 0, 1, 0, 8192, 2_600_000, 2_700_000, "worker", 1),
    ("stall", 0, -1, -1, 0, 1_100_000, 2_700_000, "caller", 77),
    ("compute", 0, -1, -1, 6144, 2_800_000, 4_800_000, "caller", 77),
    ("read", 1, -1, -1, 8192, 2_800_000, 3_000_000, "io", 0),
    ("compute", 1, -1, -1, 8192, 4_900_000, 5_900_000, "caller", 77),
]


@pytest.fixture
def trace_file(tmp_path):
    trace = build_chrome_trace(EVENTS, block_names={0: "layers.0", 1: "layers.1"}, tensor_names=["a", "b"],
                               thread_names={77: "MainThread"},
                               other_data={"model_id": "m", "backend": "pread", "budget_bytes": 1 << 20})
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    return path


def test_lanes_top_to_bottom_and_totals(trace_file):
    trace = json.loads(trace_file.read_text())
    lanes = trace_lanes(trace)
    assert [label for label, _kind, _spans in lanes] == [
        "compute · MainThread (thread 77)", "stall · MainThread (thread 77)", "read · io 0", "read · io 1",
        "verify", "decompress"]
    assert sorted(lanes[0][2]) == [(1.8, 2.0), (3.9, 1.0)]  # (start ms, duration ms) from the first event
    assert len(lanes[4][2]) == 2  # both workers' checksums share the verify lane
    totals = trace_totals(trace)
    assert totals["compute_s"] == pytest.approx(3e-3) and totals["stall_s"] == pytest.approx(1.6e-3)
    assert totals["bytes_read"] == 4096 + 2048 + 8192


def test_cli_writes_a_png(trace_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    assert cli.main(["trace-plot", str(trace_file), "-o", str(out)]) == cli.EXIT_OK
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.strip() == str(out)
    # Default output: the trace's name with .png.
    assert cli.main(["trace-plot", str(trace_file)]) == cli.EXIT_OK
    assert trace_file.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_empty_trace_still_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_trace(build_chrome_trace([]), tmp_path / "empty.png")
    assert open(out, "rb").read(8) == PNG_MAGIC


def test_not_a_trace_is_an_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "bad.json"
    bad.write_text('{"events": []}')
    assert cli.main(["trace-plot", str(bad), "-o", str(tmp_path / "x.png")]) == cli.EXIT_ERROR
    assert "not a Chrome trace" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert cli.main(["trace-plot", str(tmp_path / "missing.json")]) == cli.EXIT_ERROR


def test_without_matplotlib_says_how_to_install_it(trace_file, tmp_path, monkeypatch, capsys):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cli.main(["trace-plot", str(trace_file), "-o", str(tmp_path / "x.png")]) == cli.EXIT_ERROR
    assert "pip install matplotlib" in capsys.readouterr().err
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_trace(trace_file, tmp_path / "y.png")

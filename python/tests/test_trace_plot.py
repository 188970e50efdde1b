"""``tensorstream trace-plot`` (tensorstream/trace_plot.py): lanes, totals, a PNG, and clear errors."""

from __future__ import annotations

import json
import sys

import pytest

from tensorstream import cli
from tensorstream.trace import build_chrome_trace
from tensorstream.trace_plot import _header, plot_trace, reads_in_flight, trace_lanes, trace_totals, union_intervals

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


def test_detailed_lanes_top_to_bottom_and_totals(trace_file):
    trace = json.loads(trace_file.read_text())
    lanes = trace_lanes(trace, "detailed")
    assert [lane.label for lane in lanes] == [
        "compute · MainThread (thread 77)", "stall · MainThread (thread 77)", "read · io 0", "read · io 1",
        "verify", "decompress"]
    # (start ms, duration ms) from the first event
    assert sorted((s.start_ms, s.dur_ms) for s in lanes[0].spans) == [(1.8, 2.0), (3.9, 1.0)]
    assert len(lanes[4].spans) == 2  # both workers' checksums share the verify lane
    totals = trace_totals(trace)
    assert totals["compute_s"] == pytest.approx(3e-3) and totals["stall_s"] == pytest.approx(1.6e-3)
    assert totals["bytes_read"] == 4096 + 2048 + 8192


def test_compact_lanes_are_one_per_kind_with_reads_merged(trace_file):
    trace = json.loads(trace_file.read_text())
    lanes = trace_lanes(trace)  # compact is the default
    assert [(lane.label, lane.kind) for lane in lanes] == [
        ("compute", "compute"), ("stall", "stall"), ("reads in flight", "read"), ("verify", "verify"),
        ("decompress", "decompress")]
    assert sorted(lanes[0].spans) == [(1.8, 2.0, "layers.0"), (3.9, 1.0, "layers.1")]  # each span knows its block
    # Both I/O lanes' reads of layers.0 (0-1 ms and 0-1.5 ms) become one interval; layers.1's read stays apart.
    assert [s.block for s in lanes[2].spans] == ["layers.0", "layers.1"]
    assert [(s.start_ms, s.dur_ms) for s in lanes[2].spans] == [(0.0, 1.5), (1.8, pytest.approx(0.2))]
    assert len(lanes[3].spans) == 2
    assert trace_lanes(trace, "compact") == lanes
    with pytest.raises(ValueError, match="compact, detailed"):
        trace_lanes(trace, "wide")


def test_compact_lanes_split_by_caller_only_when_several_threads_ran():
    events = [("compute", 0, -1, -1, 0, 0, 1_000_000, "caller", 5),
              ("compute", 1, -1, -1, 0, 1_000_000, 2_000_000, "caller", 6),
              ("stall", 1, -1, -1, 0, 500_000, 1_000_000, "caller", 6)]
    trace = build_chrome_trace(events, thread_names={5: "A", 6: "B"})
    assert [lane.label for lane in trace_lanes(trace)] == [
        "compute · A (thread 5)", "compute · B (thread 6)", "stall · B (thread 6)"]
    # Only kinds present get a lane: no reads, no workers here.
    assert [lane.label for lane in trace_lanes(build_chrome_trace(events[:1]))] == ["compute"]


def test_union_intervals():
    assert union_intervals([]) == []
    assert union_intervals([(5, 6), (0, 2), (1, 3), (3, 4), (7, 9), (7.5, 8), (10, 10)]) == [
        (0, 4), (5, 6), (7, 9)]  # overlapping, touching and nested merge; empty dropped; sorted


def test_reads_in_flight_steps(trace_file):
    trace = json.loads(trace_file.read_text())
    assert reads_in_flight(trace) == [(0.0, 2), (1.0, 1), (1.5, 0), (1.8, 1), (2.0, 0)]


MS = 1_000_000  # ns


def test_disk_idle_while_compute_waits():
    # Wall 10 ms. Reads 0-2 and 1-3 ms (one interval, 0-3), 6-7 ms: 4 ms in flight, 3000 bytes. Stalls 2-5 ms
    # (disk idle 3-5) and 6.5-8 ms (idle 7-8): 4.5 ms waiting, 3 ms of it with no read in flight.
    events = [("read", 0, 0, 0, 1000, 0, 2 * MS, "io", 0), ("read", 0, 1, 0, 1000, 1 * MS, 3 * MS, "io", 1),
              ("read", 1, 0, 0, 1000, 6 * MS, 7 * MS, "io", 0),
              ("stall", 0, -1, -1, 0, 2 * MS, 5 * MS, "caller", 1),
              ("stall", 1, -1, -1, 0, int(6.5 * MS), 8 * MS, "caller", 1),
              ("compute", 1, -1, -1, 0, 8 * MS, 10 * MS, "caller", 1)]
    trace = build_chrome_trace(events)
    totals = trace_totals(trace)
    assert totals["wall_s"] == pytest.approx(10e-3)
    assert totals["read_busy_s"] == pytest.approx(4e-3)
    assert totals["read_rate_Bps"] == pytest.approx(3000 / 4e-3)
    assert totals["stall_share"] == pytest.approx(0.45)
    assert totals["stall_idle_s"] == pytest.approx(3e-3)
    assert totals["stall_idle_share"] == pytest.approx(0.3)
    _title, line = _header(trace, totals)
    assert "stall 0.005 s (45% of wall)" in line and "disk idle while compute waits: 30% of wall" in line
    # Reads covering every stall: compute waits on the disk, never on an idle one.
    busy = build_chrome_trace(events[:3] + [("read", 1, 1, 0, 1000, 3 * MS, 8 * MS, "io", 1)] + events[3:])
    assert trace_totals(busy)["stall_idle_share"] == 0.0


def _png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_compact_plot_stays_small_with_many_io_lanes(tmp_path):
    pytest.importorskip("matplotlib")
    events = [("read", k % 3, k, 0, 4096, k * MS // 4, k * MS // 4 + 2 * MS, "io", k) for k in range(32)]
    events += [("compute", b, -1, -1, 0, (9 + b) * MS, (10 + b) * MS, "caller", 1) for b in range(3)]
    trace = build_chrome_trace(events, block_names={0: "model.embed", 1: "model.layers.0", 2: "lm_head"})
    compact = _png_size(plot_trace(trace, tmp_path / "compact.png"))
    detailed = _png_size(plot_trace(trace, tmp_path / "detailed.png", lanes="detailed"))
    assert compact[1] <= 450 < detailed[1]  # 3 lanes and a legend vs 33 lanes
    with pytest.raises(ValueError, match="compact, detailed"):
        plot_trace(trace, tmp_path / "x.png", lanes="wide")


def test_cli_writes_a_png(trace_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    assert cli.main(["trace-plot", str(trace_file), "-o", str(out)]) == cli.EXIT_OK
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.strip() == str(out)
    # Default output: the trace's name with .png.
    assert cli.main(["trace-plot", str(trace_file)]) == cli.EXIT_OK
    assert trace_file.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    # --lanes detailed: one lane per I/O lane (test_compact_plot_stays_small_with_many_io_lanes compares sizes).
    detailed = tmp_path / "detailed.png"
    assert cli.main(["trace-plot", str(trace_file), "-o", str(detailed), "--lanes", "detailed"]) == cli.EXIT_OK
    assert detailed.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit):
        cli.main(["trace-plot", str(trace_file), "--lanes", "wide"])


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

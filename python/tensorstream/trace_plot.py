"""A PNG of a TensorStream Chrome trace (``tensorstream trace-plot TRACE.json -o OUT.png [--lanes detailed]``).

The default (``lanes="compact"``) view answers one question at a glance: does compute wait on I/O? Its lanes, top to
bottom:

* ``compute``: each use of a block, coloured by block (the block's name inside the bar where it fits);
* ``stall``: the caller waiting for weights; the part of a stall during which no read was in flight (the disk idle
  while compute waits: the reads wait for the budget, a checksum or a decode, not for the disk) is hatched;
* ``reads in flight``: one lane, the union of all reads, coloured by the block being read (blocks read at the same
  time share the lane's height in stripes), with a thin black step line of how many reads are in flight;
* ``verify``, ``decompress``, ``transfer``: the engine workers' spans, each kind in one lane (only kinds present).

A caller thread gets its own compute and stall lanes when more than one thread ran the model. Under the title, a
line of totals: compute and stall seconds (stall also as a share of wall time, first event to last), bytes read,
the average read rate while reads are in flight, and the share of wall time that compute waited while the disk was
idle. A large stall with a small idle share means compute waits on the disk; a large idle share means the disk
could go faster than the budget (or the workers) let it.

``lanes="detailed"`` keeps one lane per thread and kind: compute and stall per caller thread, reads per logical
I/O lane (``io k``) and for the workers that prefault mapped blocks, then checksums, decoding and transfers.

Time runs left to right in milliseconds from the first event. matplotlib is imported only when a plot is drawn
(``pip install matplotlib``); it draws on its own Agg canvas, so the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Sequence, Tuple, Union

from .trace import KINDS

__all__ = ["plot_trace", "load_trace", "trace_lanes", "trace_totals", "union_intervals", "reads_in_flight",
           "LANE_MODES", "Lane", "Span"]

LANE_MODES = ("compact", "detailed")
READS_LABEL = "reads in flight"

# One colour per kind (matplotlib's tab10), so the same kind looks the same in every plot.
COLORS = {"compute": "#2ca02c", "stall": "#d62728", "copy": "#17becf", "read": "#1f77b4", "verify": "#ff7f0e",
          "decompress": "#9467bd", "transfer": "#8c564b"}
# Kinds whose workers share one lane: a lane per worker would multiply lanes without telling more at a glance.
MERGED_KINDS = ("verify", "decompress", "transfer")
# Block colours in the compact view: tab20 without its reds (stalls are red) and greys, dark shades first, so
# neighbouring blocks differ in hue; they repeat after 16 blocks.
BLOCK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
MAX_LEGEND_BLOCKS = 40
LEGEND_COLUMNS = 10
# Worker kinds in the compact view: greys, so that their colours are not mistaken for blocks.
COMPACT_WORKER_COLORS = {"verify": "#7f7f7f", "decompress": "#525252", "transfer": "#262626"}


class Span(NamedTuple):
    start_ms: float
    dur_ms: float
    block: str  # the block's name ("" when the event has none)


class Lane(NamedTuple):
    label: str
    kind: str  # one of KINDS
    spans: List[Span]


def load_trace(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Reads a Chrome trace JSON file; ValueError if it is not one (no ``traceEvents`` list)."""
    with open(path) as f:
        try:
            trace = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(path)} is not JSON: {error}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError(f"{os.fspath(path)} is not a Chrome trace: no \"traceEvents\" list")
    return trace


def _spans(trace: Mapping[str, Any]) -> List[Dict[str, Any]]:
    return [e for e in trace["traceEvents"]
            if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in KINDS]


def _args(event: Mapping[str, Any]) -> Mapping[str, Any]:
    args = event.get("args")
    return args if isinstance(args, dict) else {}


def _span(event: Mapping[str, Any]) -> Span:
    return Span(float(event["ts"]) / 1e3, max(float(event.get("dur", 0)), 0.0) / 1e3,
                str(_args(event).get("block", "")))


def _thread_names(trace: Mapping[str, Any]) -> Dict[Any, str]:
    return {e.get("tid"): _args(e).get("name", "")
            for e in trace["traceEvents"] if isinstance(e, dict) and e.get("ph") == "M"
            and e.get("name") == "thread_name"}


def union_intervals(intervals: Iterable[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The union of ``(start, end)`` intervals as sorted, disjoint ``(start, end)`` intervals (touching ones merge;
    empty ones are dropped)."""
    merged: List[Tuple[float, float]] = []
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _length(intervals: Iterable[Tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _subtract(intervals: Sequence[Tuple[float, float]],
              holes: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """``intervals`` minus ``holes`` (both sorted and disjoint, as union_intervals returns them)."""
    out: List[Tuple[float, float]] = []
    h = 0
    for start, end in intervals:
        while h < len(holes) and holes[h][1] <= start:
            h += 1
        cursor = start
        k = h
        while k < len(holes) and holes[k][0] < end:
            if holes[k][0] > cursor:
                out.append((cursor, holes[k][0]))
            cursor = max(cursor, holes[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


def reads_in_flight(trace: Mapping[str, Any]) -> List[Tuple[float, int]]:
    """How many reads are in flight over time: ``(time_ms, count)`` steps, each count holding until the next time
    (the last step is 0)."""
    deltas: Dict[float, int] = {}
    for event in _spans(trace):
        if event["cat"] == "read":
            span = _span(event)
            if span.dur_ms > 0:
                deltas[span.start_ms] = deltas.get(span.start_ms, 0) + 1
                end = span.start_ms + span.dur_ms
                deltas[end] = deltas.get(end, 0) - 1
    steps: List[Tuple[float, int]] = []
    count = 0
    for time in sorted(deltas):
        if deltas[time]:
            count += deltas[time]
            steps.append((time, count))
    return steps


def _by_caller(spans: List[Tuple[Any, Span]], kind: str, names: Mapping[Any, str], merge: bool) -> List[Lane]:
    lanes: Dict[Any, Lane] = {}
    for tid, span in spans:
        key = "" if merge else tid
        if key not in lanes:
            label = kind if merge else f"{kind} · {names.get(tid) or f'thread {tid}'}"
            lanes[key] = Lane(label, kind, [])
        lanes[key].spans.append(span)
    return [lanes[key] for key in sorted(lanes, key=lambda k: str(k).zfill(12))]


def trace_lanes(trace: Mapping[str, Any], lanes: str = "compact") -> List[Lane]:
    """The plot's lanes, top to bottom, with their spans in milliseconds from the first event.

    ``lanes="compact"``: compute, stall (one lane each, or one per caller thread when several ran the model), the
    reads in flight (one lane: per block, the union of its reads, so blocks read at the same time overlap), then
    verify, decompress and transfer (only kinds present). ``lanes="detailed"``: one lane per thread and kind, reads
    per I/O lane.
    """
    if lanes not in LANE_MODES:
        raise ValueError(f"lanes must be one of {', '.join(LANE_MODES)}, not {lanes!r}")
    names = _thread_names(trace)
    if lanes == "detailed":
        detailed: Dict[Tuple[int, Any], Lane] = {}
        for event in _spans(trace):
            kind = event["cat"]
            tid = event.get("tid", 0)
            if kind in MERGED_KINDS:
                key: Tuple[int, Any] = (KINDS.index(kind), "")
                label = kind
            else:
                key = (KINDS.index(kind), tid)
                label = f"{kind} · {names.get(tid) or f'thread {tid}'}"
            if key not in detailed:
                detailed[key] = Lane(label, kind, [])
            detailed[key].spans.append(_span(event))
        return [detailed[key] for key in sorted(detailed, key=lambda k: (k[0], str(k[1]).zfill(12)))]

    by_kind: Dict[str, List[Tuple[Any, Span]]] = {kind: [] for kind in KINDS}
    for event in _spans(trace):
        by_kind[event["cat"]].append((event.get("tid", 0), _span(event)))
    callers = {tid for kind in ("compute", "stall") for tid, _span_ in by_kind[kind]}
    out = _by_caller(by_kind["compute"], "compute", names, len(callers) <= 1)
    out += _by_caller(by_kind["stall"], "stall", names, len(callers) <= 1)
    if by_kind["copy"]:  # GPU: host-to-device copies on the copy stream, beside compute
        out.append(Lane("copy stream", "copy", sorted(span for _tid, span in by_kind["copy"])))
    if by_kind["read"]:
        per_block: Dict[str, List[Tuple[float, float]]] = {}
        for _tid, span in by_kind["read"]:
            per_block.setdefault(span.block, []).append((span.start_ms, span.start_ms + span.dur_ms))
        reads = [Span(start, end - start, block) for block, intervals in per_block.items()
                 for start, end in union_intervals(intervals)]
        out.append(Lane(READS_LABEL, "read", sorted(reads)))
    for kind in MERGED_KINDS:
        if by_kind[kind]:
            out.append(Lane(kind, kind, [span for _tid, span in by_kind[kind]]))
    return out


def trace_totals(trace: Mapping[str, Any]) -> Dict[str, float]:
    """Totals summed from the events themselves:

    * ``compute_s``, ``stall_s``: the durations of all compute and stall spans (summed over caller threads);
    * ``bytes_read``: the bytes of all reads;
    * ``wall_s``: first event's start to last event's end;
    * ``read_busy_s``: how long at least one read was in flight; ``read_rate_Bps``: bytes_read / read_busy_s;
    * ``stall_idle_s``: how long some caller waited while no read was in flight (the disk idle while compute waits),
      ``stall_idle_share``: that as a share of wall_s; ``stall_share``: the union of stalls as a share of wall_s.
    """
    spans = _spans(trace)
    totals: Dict[str, float] = {"compute_s": 0.0, "stall_s": 0.0, "bytes_read": 0}
    reads: List[Tuple[float, float]] = []
    stalls: List[Tuple[float, float]] = []
    first, last = float("inf"), float("-inf")
    for event in spans:
        start = float(event["ts"]) / 1e6
        duration = max(float(event.get("dur", 0)), 0.0) / 1e6
        first, last = min(first, start), max(last, start + duration)
        if event["cat"] == "compute":
            totals["compute_s"] += duration
        elif event["cat"] == "stall":
            totals["stall_s"] += duration
            stalls.append((start, start + duration))
        elif event["cat"] == "read":
            totals["bytes_read"] += int(_args(event).get("bytes", 0))
            reads.append((start, start + duration))
    wall = last - first if spans else 0.0
    read_union = union_intervals(reads)
    stall_union = union_intervals(stalls)
    read_busy = _length(read_union)
    stall_idle = _length(_subtract(stall_union, read_union))
    totals.update({
        "wall_s": wall,
        "read_busy_s": read_busy,
        "read_rate_Bps": totals["bytes_read"] / read_busy if read_busy > 0 else 0.0,
        "stall_idle_s": stall_idle,
        "stall_share": _length(stall_union) / wall if wall > 0 else 0.0,
        "stall_idle_share": stall_idle / wall if wall > 0 else 0.0,
    })
    return totals


def _size(nbytes: float) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(nbytes)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _import_matplotlib() -> Tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("tensorstream trace-plot needs matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def _header(trace: Mapping[str, Any], totals: Mapping[str, float]) -> Tuple[str, str]:
    """The title (what ran) and the line of totals under it."""
    other = trace.get("otherData", {}) if isinstance(trace.get("otherData"), dict) else {}
    details = [str(other["model_id"])] if other.get("model_id") else []
    if other.get("backend"):
        details.append(f"backend {other['backend']}")
    if other.get("budget_bytes"):
        details.append(f"budget {_size(other['budget_bytes'])}")
    if other.get("prefetch_strategy"):
        details.append(f"prefetch {other['prefetch_strategy']}")
    io_lanes = {name for name in _thread_names(trace).values() if str(name).startswith("io ")}
    if io_lanes:
        details.append(f"{len(io_lanes)} I/O lanes")
    if other.get("dropped_events"):
        details.append(f"{other['dropped_events']} events dropped")
    title = ", ".join(details) or "TensorStream trace"
    wall = totals["wall_s"]
    line = (f"wall {wall:.3f} s · compute {totals['compute_s']:.3f} s · stall {totals['stall_s']:.3f} s "
            f"({100 * totals['stall_share']:.0f}% of wall) · read {_size(totals['bytes_read'])}")
    if totals["read_busy_s"] > 0:
        line += (f" at {_size(totals['read_rate_Bps'])}/s while in flight "
                 f"({100 * totals['read_busy_s'] / wall:.0f}% of wall)" if wall > 0 else "")
    line += f" · disk idle while compute waits: {100 * totals['stall_idle_share']:.0f}% of wall"
    return title, line


def _block_colors(trace: Mapping[str, Any]) -> Dict[str, str]:
    """Block name -> colour, in block index order."""
    index: Dict[str, float] = {}
    for event in _spans(trace):
        args = _args(event)
        name = str(args.get("block", ""))
        if name and name not in index:
            try:
                index[name] = float(args.get("block_index", len(index)))
            except (TypeError, ValueError):
                index[name] = float(len(index))
    ordered = sorted(index, key=lambda name: (index[name], name))
    return {name: BLOCK_COLORS[i % len(BLOCK_COLORS)] for i, name in enumerate(ordered)}


def _fitting_label(name: str, width_px: float, fontsize: float, dpi: float) -> str:
    """``name``, or a shorter form of it (without its first dotted part, then only its last), that fits in
    ``width_px``; "" when none fits."""
    parts = name.split(".")
    for candidate in (name, ".".join(parts[1:]), parts[-1]):
        if candidate and len(candidate) * fontsize * 0.62 * dpi / 72 + 6 <= width_px:
            return candidate
    return ""


def _rectangles(axes: Any, boxes: Sequence[Tuple[float, float, float, float]], color: str, **kwargs: Any) -> None:
    """Draws ``(x, y, width, height)`` boxes as one collection."""
    if not boxes:
        return
    from matplotlib.collections import PolyCollection

    verts = [[(x, y), (x + w, y), (x + w, y + h), (x, y + h)] for x, y, w, h in boxes]
    axes.add_collection(PolyCollection(verts, facecolors=color, **kwargs))


def _draw_reads(axes: Any, row: int, spans: Sequence[Span], colors: Mapping[str, str],
                steps: Sequence[Tuple[float, int]]) -> None:
    """The reads-in-flight lane: at each moment, the blocks being read share the lane's height in stripes (in
    block order, top to bottom); a black step line gives the number of reads in flight (lane bottom 0, top the
    maximum)."""
    order = {name: i for i, name in enumerate(colors)}
    changes: Dict[float, Dict[str, int]] = {}  # time -> block -> +1 (a read of it starts) / -1 (one ends)
    for span in spans:
        for time, delta in ((span.start_ms, 1), (span.start_ms + span.dur_ms, -1)):
            at = changes.setdefault(time, {})
            at[span.block] = at.get(span.block, 0) + delta
    boxes: Dict[str, List[Tuple[float, float, float, float]]] = {}
    top, height = row - 0.4, 0.8
    active: Dict[str, int] = {}
    times = sorted(changes)
    for left, right in zip(times, times[1:]):  # a sweep: the blocks being read between consecutive changes
        for block, delta in changes[left].items():
            active[block] = active.get(block, 0) + delta
            if active[block] <= 0:
                del active[block]
        stripe = height / max(len(active), 1)
        for i, block in enumerate(sorted(active, key=lambda name: (order.get(name, len(order)), name))):
            boxes.setdefault(block, []).append((left, top + i * stripe, right - left, stripe))
    for block, block_boxes in boxes.items():
        _rectangles(axes, block_boxes, colors.get(block, COLORS["read"]), linewidth=0, alpha=0.9)
    peak = max((count for _time, count in steps), default=0)
    if peak > 0:
        axes.step([t for t, _c in steps], [row + 0.4 - 0.8 * c / peak for _t, c in steps], where="post",
                  color="black", linewidth=0.7, alpha=0.8)
        axes.text(1.002, row, f"max {peak}", transform=axes.get_yaxis_transform(), fontsize=7, va="center",
                  ha="left", color="black")


def plot_trace(trace: Union[str, os.PathLike, Mapping[str, Any]], output: Union[str, os.PathLike],
               lanes: str = "compact") -> str:
    """Draws ``trace`` (a path or a loaded trace dict) as a PNG at ``output``; returns the output path.
    ``lanes``: ``"compact"`` (default: compute, stall, reads in flight, worker kinds) or ``"detailed"`` (one lane
    per I/O lane and thread).

    Raises ImportError (saying ``pip install matplotlib``) without matplotlib, ValueError for a file that is not
    a Chrome trace or an unknown ``lanes``, OSError when a file cannot be read or written.
    """
    if lanes not in LANE_MODES:
        raise ValueError(f"lanes must be one of {', '.join(LANE_MODES)}, not {lanes!r}")
    Figure, FigureCanvasAgg = _import_matplotlib()
    if not isinstance(trace, Mapping):
        trace = load_trace(trace)
    rows = trace_lanes(trace, lanes)
    totals = trace_totals(trace)
    compact = lanes == "compact"
    colors = _block_colors(trace) if compact else {}
    legend_blocks = compact and 0 < len(colors) <= MAX_LEGEND_BLOCKS
    legend_rows = -(-(len(colors) + 1) // LEGEND_COLUMNS) if legend_blocks else 0

    if compact:
        height = 1.5 + 0.42 * max(len(rows), 1) + 0.22 * legend_rows
    else:
        height = max(2.5, 0.32 * len(rows) + 1.6)
    dpi = 100
    figure = Figure(figsize=(14 if compact else 13, height), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    end_ms = max([0.0] + [s.start_ms + s.dur_ms for lane in rows for s in lane.spans])
    idle_boxes: List[Tuple[float, float, float, float]] = []  # the parts of stalls with no read in flight
    read_union = union_intervals((s.start_ms, s.start_ms + s.dur_ms) for lane in rows if lane.kind == "read"
                                 for s in lane.spans)
    for row, lane in enumerate(rows):
        if compact and lane.kind == "read":
            _draw_reads(axes, row, lane.spans, colors, reads_in_flight(trace))
        elif compact and lane.kind == "compute":
            by_block: Dict[str, List[Tuple[float, float]]] = {}
            for span in lane.spans:
                by_block.setdefault(span.block, []).append((span.start_ms, span.dur_ms))
            for block, spans in by_block.items():
                axes.broken_barh(spans, (row - 0.4, 0.8), facecolors=colors.get(block, COLORS["compute"]),
                                 linewidth=0)
        else:
            color = COMPACT_WORKER_COLORS.get(lane.kind) if compact else None
            axes.broken_barh([(s.start_ms, s.dur_ms) for s in lane.spans], (row - 0.4, 0.8),
                             facecolors=color or COLORS.get(lane.kind, "gray"),
                             alpha=0.55 if lane.kind in MERGED_KINDS else 0.9, linewidth=0)
        if compact and lane.kind == "stall":
            stall_union = union_intervals((s.start_ms, s.start_ms + s.dur_ms) for s in lane.spans)
            idle_boxes += [(start, row - 0.4, end - start, 0.8) for start, end in _subtract(stall_union, read_union)]
    if idle_boxes:
        _rectangles(axes, idle_boxes, "none", edgecolor="black", hatch="////", linewidth=0)
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels([lane.label for lane in rows], fontsize=8)
    axes.set_ylim(max(len(rows), 1) - 0.5, -0.5)  # first lane on top
    axes.set_xlim(0, end_ms * 1.01 if end_ms > 0 else 1)
    axes.set_xlabel("time (ms)", fontsize=8)
    axes.tick_params(axis="x", labelsize=8)
    axes.grid(axis="x", alpha=0.3)

    title, line = _header(trace, totals)
    axes.set_title(f"{title}\n{line}", fontsize=9)
    if not rows:
        axes.text(0.5, 0.5, "no events", ha="center", va="center", transform=axes.transAxes)
    if legend_blocks:
        from matplotlib.patches import Patch

        handles = [Patch(facecolor=color, label=name) for name, color in colors.items()]
        if idle_boxes:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="////", label="stall, disk idle"))
        columns = min(len(handles), LEGEND_COLUMNS)
        figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7, frameon=False,
                      handlelength=1.2, columnspacing=1.2, borderaxespad=0.3)
        legend_in = 0.05 + 0.17 * -(-len(handles) // columns)
        figure.tight_layout(rect=(0, legend_in / height, 1, 1))
    else:
        figure.tight_layout()
    if compact:
        # Block names inside compute spans wide enough to hold them (measured once the layout is final).
        x0, x1 = axes.get_xlim()
        px_per_ms = axes.get_window_extent().width / (x1 - x0)
        for row, lane in enumerate(rows):
            if lane.kind != "compute":
                continue
            for span in lane.spans:
                label = _fitting_label(span.block, span.dur_ms * px_per_ms, 7, dpi)
                if label:
                    axes.text(span.start_ms + span.dur_ms / 2, row, label, ha="center", va="center", fontsize=7,
                              color="black", clip_on=True)
    out = os.fspath(output)
    figure.savefig(out, format="png")
    return out

"""A PNG of a TensorStream Chrome trace (``tensorstream trace-plot TRACE.json -o OUT.png``).

One horizontal lane per thread and kind, top to bottom: compute and stall for each Python thread that ran the model,
reads for each I/O lane (and for the workers that prefault mapped blocks), then checksums, decoding and transfers
(all workers in one lane each, drawn translucent where they overlap). Time runs left to right in milliseconds from
the first event. Gaps in the compute lane that line up with stall bars are compute waiting for I/O; reads that
run ahead of compute with no stalls mean the prefetch keeps up. The title gives the totals: compute and stall
seconds and bytes read.

matplotlib is imported only when a plot is drawn (``pip install matplotlib``); it draws on its own Agg canvas, so
the caller's pyplot state and backend are left alone.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Tuple, Union

from .trace import KINDS

__all__ = ["plot_trace", "load_trace", "trace_lanes", "trace_totals"]

# One colour per kind (matplotlib's tab10), so the same kind looks the same in every plot.
COLORS = {"compute": "#2ca02c", "stall": "#d62728", "read": "#1f77b4", "verify": "#ff7f0e",
          "decompress": "#9467bd", "transfer": "#8c564b"}
# Kinds whose workers share one lane: a lane per worker would multiply lanes without telling more at a glance.
MERGED_KINDS = ("verify", "decompress", "transfer")

Lane = Tuple[str, str, List[Tuple[float, float]]]  # (label, kind, [(start_ms, duration_ms), ...])


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


def trace_lanes(trace: Mapping[str, Any]) -> List[Lane]:
    """The plot's lanes, top to bottom, with their spans in milliseconds."""
    names = {e.get("tid"): e.get("args", {}).get("name", "")
             for e in trace["traceEvents"] if isinstance(e, dict) and e.get("ph") == "M"
             and e.get("name") == "thread_name"}
    lanes: Dict[Tuple[int, Any], Lane] = {}
    for event in _spans(trace):
        kind = event["cat"]
        tid = event.get("tid", 0)
        if kind in MERGED_KINDS:
            key: Tuple[int, Any] = (KINDS.index(kind), "")
            label = kind
        else:
            key = (KINDS.index(kind), tid)
            label = f"{kind} · {names.get(tid) or f'thread {tid}'}"
        if key not in lanes:
            lanes[key] = (label, kind, [])
        lanes[key][2].append((float(event["ts"]) / 1e3, max(float(event.get("dur", 0)), 0.0) / 1e3))
    return [lanes[key] for key in sorted(lanes, key=lambda k: (k[0], str(k[1]).zfill(12)))]


def trace_totals(trace: Mapping[str, Any]) -> Dict[str, float]:
    """compute_s, stall_s and bytes_read, summed from the events themselves."""
    totals = {"compute_s": 0.0, "stall_s": 0.0, "bytes_read": 0}
    for event in _spans(trace):
        if event["cat"] == "compute":
            totals["compute_s"] += float(event.get("dur", 0)) / 1e6
        elif event["cat"] == "stall":
            totals["stall_s"] += float(event.get("dur", 0)) / 1e6
        elif event["cat"] == "read":
            totals["bytes_read"] += int(event.get("args", {}).get("bytes", 0))
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


def plot_trace(trace: Union[str, os.PathLike, Mapping[str, Any]], output: Union[str, os.PathLike]) -> str:
    """Draws ``trace`` (a path or a loaded trace dict) as a PNG at ``output``; returns the output path.

    Raises ImportError (saying ``pip install matplotlib``) without matplotlib, ValueError for a file that is not
    a Chrome trace, OSError when a file cannot be read or written.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    if not isinstance(trace, Mapping):
        trace = load_trace(trace)
    lanes = trace_lanes(trace)
    totals = trace_totals(trace)
    other = trace.get("otherData", {}) if isinstance(trace.get("otherData"), dict) else {}

    height = max(2.5, 0.32 * len(lanes) + 1.6)
    figure = Figure(figsize=(13, height), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    end_ms = 0.0
    for row, (_label, kind, spans) in enumerate(lanes):
        axes.broken_barh(spans, (row - 0.4, 0.8), facecolors=COLORS.get(kind, "gray"),
                         alpha=0.55 if kind in MERGED_KINDS else 0.9, linewidth=0)
        end_ms = max([end_ms] + [start + duration for start, duration in spans])
    axes.set_yticks(range(len(lanes)))
    axes.set_yticklabels([label for label, _kind, _spans in lanes], fontsize=8)
    axes.set_ylim(max(len(lanes), 1) - 0.5, -0.5)  # first lane on top
    axes.set_xlim(0, end_ms * 1.01 if end_ms > 0 else 1)
    axes.set_xlabel("time (ms)")
    axes.grid(axis="x", alpha=0.3)

    busy = totals["compute_s"] + totals["stall_s"]
    stalled = f" ({100 * totals['stall_s'] / busy:.0f}% of compute + stall)" if busy > 0 else ""
    title = (f"compute {totals['compute_s']:.3f} s, stall {totals['stall_s']:.3f} s{stalled}, "
             f"read {_size(totals['bytes_read'])}")
    details = [str(other[k]) for k in ("model_id",) if other.get(k)]
    if other.get("backend"):
        details.append(f"backend {other['backend']}")
    if other.get("budget_bytes"):
        details.append(f"budget {_size(other['budget_bytes'])}")
    if other.get("dropped_events"):
        details.append(f"{other['dropped_events']} events dropped")
    if details:
        title += "\n" + ", ".join(details)
    axes.set_title(title, fontsize=10)
    if not lanes:
        axes.text(0.5, 0.5, "no events", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    out = os.fspath(output)
    figure.savefig(out, format="png")
    return out

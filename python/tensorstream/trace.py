"""Chrome traces of an offloaded model: when each block was read, verified, decoded and computed, and where the
forward pass waited.

Turned on by ``Config.trace_path`` (or ``TENSORSTREAM_TRACE=/path/trace.json``). ``offload`` then enables the
engine's trace (C++, ``cpp/include/tensorstream/stats/trace.hpp``) and the hooks record one ``compute`` span per use
of a block, from the moment its weights are bound (after any wait) to its post-forward hook. The trace is written
when the model is cleaned up (``model.cleanup_tensorstream()``), when its engine is closed by garbage collection or
at interpreter exit, and on demand with ``tensorstream.write_trace`` (torch/offload.py: it finds the model's
collector; this module knows nothing of models, so nothing here imports the PyTorch side).

The file is Chrome trace-event JSON (open it in https://ui.perfetto.dev or chrome://tracing, or draw it with
``tensorstream trace-plot``)::

    {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {"backend": ..., "budget_bytes": ..., ...}}

Every span is a complete event (``"ph": "X"``) with ``ts`` / ``dur`` in microseconds from the first event, ``cat``
its kind (``read``, ``verify``, ``decompress``, ``transfer``, ``stall``, ``compute``), ``name`` the kind and the
block, and ``args`` the block name and index, bytes, and tensor and chunk where the event is about one chunk. Lanes
are threads (``"M"`` thread_name events): one per Python thread that ran the model (its stalls and compute spans),
one per I/O lane (``io k``: the reads in flight, each holding the lowest free lane from submit to completion), and
one per engine worker (checksums, decoding, transfers, and the page faults of blocks that are mapped rather than
read). Engine and Python times are both CLOCK_MONOTONIC (``otherData.t0_monotonic_ns`` is the zero of ``ts``).

Memory: at most ``max_events`` events are kept (engine and compute together, default 2**20, about 50 MB at worst);
later ones are counted in ``otherData.dropped_events``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import __version__
from .config import check_trace_path
from .errors import ConfigError

logger = logging.getLogger("tensorstream")

__all__ = ["TraceCollector", "start_trace", "KINDS", "DEFAULT_MAX_EVENTS"]

# The kinds of span, in the order lanes are drawn by trace_plot.
KINDS = ("compute", "stall", "copy", "read", "verify", "decompress", "transfer")
# As in the engine (TraceRecorder::kDefaultMaxEvents): about three events per 4 MiB chunk, so a million covers many
# passes over a large model, while a trace left on for days stays bounded.
DEFAULT_MAX_EVENTS = 1 << 20
PID = 1
_LANE_ORDER = {"caller": 0, "copy": 1, "io": 2, "worker": 3}

# One event: (kind, block, tensor, chunk, bytes, start_ns, end_ns, lane_kind, lane_index), as _core returns them.
Event = Tuple[str, int, int, int, int, int, int, str, int]


class TraceCollector:
    """The timeline of one offloaded model: engine events (drained from ``_core``) plus compute spans (from the
    hooks). Thread-safe: ``compute`` is called by every thread that runs the model."""

    def __init__(self, engine: Any, path: Optional[str], *, block_names: Mapping[int, str],
                 block_bytes: Mapping[int, int], tensor_names: Sequence[str], other_data: Mapping[str, Any],
                 max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.engine = engine
        self.path = path
        self.block_names = dict(block_names)
        self.block_bytes = dict(block_bytes)
        self.tensor_names = list(tensor_names)
        self.other_data = dict(other_data)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._events: List[Event] = []
        self._dropped = 0
        self._thread_names: Dict[int, str] = {}
        self._finalizer: Optional[weakref.finalize] = None

    # -- recording ---------------------------------------------------------------------------------------------

    def compute(self, block: int, start_ns: int, end_ns: int) -> None:
        """Records that the calling thread computed with ``block`` from ``start_ns`` to ``end_ns``
        (time.monotonic_ns())."""
        tid = threading.get_native_id()
        with self._lock:
            if tid not in self._thread_names:
                self._thread_names[tid] = threading.current_thread().name
            if len(self._events) >= self.max_events:
                self._dropped += 1
                return
            self._events.append(("compute", block, -1, -1, self.block_bytes.get(block, 0), start_ns, end_ns,
                                 "caller", tid))

    def row_read(self, block: int, tensor: int, nbytes: int, start_ns: int, end_ns: int) -> None:
        """Records a read of embedding rows (torch/rows.py) that the calling thread did itself, outside the engine:
        a ``read`` span on the caller's lane."""
        tid = threading.get_native_id()
        with self._lock:
            if tid not in self._thread_names:
                self._thread_names[tid] = threading.current_thread().name
            if len(self._events) >= self.max_events:
                self._dropped += 1
                return
            self._events.append(("read", block, tensor, -1, nbytes, start_ns, end_ns, "caller", tid))

    def collect(self) -> None:
        """Moves the engine's buffered events here (the engine keeps its last events when it closes, so this also
        works after close)."""
        engine = self.engine
        if engine is None:
            return
        events, dropped = engine.drain_trace()
        with self._lock:
            room = max(self.max_events - len(self._events), 0)
            self._events.extend(events[:room])
            self._dropped += dropped + max(len(events) - room, 0)

    # -- output ------------------------------------------------------------------------------------------------

    def chrome_trace(self) -> Dict[str, Any]:
        """The trace so far as a Chrome trace-event dict (collects the engine's events first)."""
        self.collect()
        with self._lock:
            events = list(self._events)
            dropped = self._dropped
            thread_names = dict(self._thread_names)
        return build_chrome_trace(events, dropped=dropped, block_names=self.block_names,
                                  tensor_names=self.tensor_names, thread_names=thread_names,
                                  other_data=self.other_data)

    def write(self, path: Optional[str] = None) -> str:
        """Writes the trace so far to ``path`` (default: the configured trace_path); returns the path."""
        target = path if path is not None else self.path
        if target is None:
            raise ConfigError("no trace path: pass path= or set Config.trace_path / TENSORSTREAM_TRACE",
                              field="trace_path")
        trace = self.chrome_trace()
        _write_json(target, trace)
        logger.info("trace: %d events written to %s (%d dropped)", len(trace["traceEvents"]), target,
                    trace["otherData"]["dropped_events"])
        return target

    def close(self) -> None:
        """Writes the trace to its path once, when the model's engine closes. Never raises: a trace that cannot be
        written is a WARNING on the ``tensorstream`` logger, not a failed cleanup."""
        finalizer = self._finalizer
        if finalizer is not None:
            finalizer()  # runs _final_write once, however often close() is called
        else:
            self._final_write()

    def _final_write(self) -> None:
        try:
            if self.path is not None:
                self.write()
        except Exception as error:  # noqa: BLE001 - reported, never raised from cleanup or a finalizer
            try:
                logger.warning("TensorStream could not write the trace to %s: %s", self.path, error)
            except Exception:  # noqa: BLE001 - logging may be gone at interpreter exit
                pass
        finally:
            self.engine = None


def build_chrome_trace(events: Sequence[Event], *, dropped: int = 0, block_names: Optional[Mapping[int, str]] = None,
                       tensor_names: Sequence[str] = (), thread_names: Optional[Mapping[int, str]] = None,
                       other_data: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Chrome trace-event JSON (as a dict) for ``events``: X events in microseconds from the first one, a lane
    (tid) per caller thread, I/O lane and worker, named by M events, and totals in otherData."""
    block_names = block_names or {}
    thread_names = thread_names or {}
    other_data = other_data or {}
    t0 = min((e[5] for e in events), default=0)
    lanes = sorted({(e[7], e[8]) for e in events}, key=lambda lane: (_LANE_ORDER.get(lane[0], 3), lane[1]))
    tids = {lane: i + 1 for i, lane in enumerate(lanes)}
    out: List[Dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": PID, "tid": 0,
                                  "args": {"name": f"tensorstream {other_data.get('model_id', '')}".strip()}}]
    for lane, tid in tids.items():
        out.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": _lane_name(lane,
                                                                                                         thread_names)}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
    totals = {kind: 0 for kind in KINDS}
    bytes_read = 0
    spans = []
    for kind, block, tensor, chunk, nbytes, start, end, lane_kind, lane_index in events:
        end = max(end, start)
        totals[kind] = totals.get(kind, 0) + (end - start)
        if kind == "read":
            bytes_read += nbytes
        block_name = block_names.get(block, f"block {block}")
        args: Dict[str, Any] = {"block": block_name, "block_index": block, "bytes": nbytes,
                                "lane": _lane_name((lane_kind, lane_index), thread_names)}
        if tensor >= 0:
            args["tensor"] = tensor_names[tensor] if tensor < len(tensor_names) else tensor
        if chunk >= 0:
            args["chunk"] = chunk
        spans.append({"name": f"{kind} {block_name}", "cat": kind, "ph": "X", "pid": PID,
                      "tid": tids[(lane_kind, lane_index)], "ts": round((start - t0) / 1000, 3),
                      "dur": round((end - start) / 1000, 3), "args": args})
    spans.sort(key=lambda e: (e["ts"], e["tid"]))
    other = dict(other_data)
    other.update({
        "clock": "CLOCK_MONOTONIC",
        "t0_monotonic_ns": t0,
        "dropped_events": dropped,
        "events": len(spans),
        "compute_s": totals["compute"] / 1e9,
        "stall_s": totals["stall"] / 1e9,
        "bytes_read": bytes_read,
    })
    return {"traceEvents": out + spans, "displayTimeUnit": "ms", "otherData": other}


def _lane_name(lane: Tuple[str, int], thread_names: Mapping[int, str]) -> str:
    kind, index = lane
    if kind == "caller":
        name = thread_names.get(index)
        return f"{name} (thread {index})" if name else f"caller thread {index}"
    if kind == "copy":
        return "copy stream"
    return f"{kind} {index}"


def _write_json(path: str, value: Dict[str, Any]) -> None:
    """Writes ``value`` to ``path`` whole or not at all (a temporary file in the same directory, then a rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---- the offload side ----------------------------------------------------------------------------------------


def start_trace(engine: Any, config: Any, model_id: str, blocks: Sequence[Any], owner: Any,
                max_events: int = DEFAULT_MAX_EVENTS) -> TraceCollector:
    """Turns the engine's tracing on and returns the collector for ``offload``'s hooks. ``blocks``: the
    StreamBlocks; ``owner``: the object whose end (garbage collection, interpreter exit) writes the trace when no
    cleanup did."""
    from .store import open_model

    path = check_trace_path(config.trace_path, "trace_path")
    with open_model(config.storage_path, model_id) as store:
        tensor_names = store.tensor_names()
    other = {
        "model_id": model_id,
        "storage_path": config.storage_path,
        "backend": engine.backend_name,
        "budget_bytes": engine.budget_bytes,
        "requested_backend": config.backend.value,
        "prefetch_strategy": config.prefetch_strategy.value,
        "memory_pressure_mode": config.memory_pressure_mode,
        "num_io_threads": config.num_io_threads,
        "verify_checksums": config.verify_checksums,
        "compression_level": config.store_compression_level,
        "streamed_blocks": len(blocks),
        "tensorstream_version": __version__,
        "created_unix_s": time.time(),
    }
    collector = TraceCollector(engine, path, block_names={b.index: b.name for b in blocks},
                               block_bytes={b.index: b.block.nbytes for b in blocks}, tensor_names=tensor_names,
                               other_data=other, max_events=max_events)
    engine.enable_tracing(max_events)
    collector._finalizer = weakref.finalize(owner, collector._final_write)
    return collector

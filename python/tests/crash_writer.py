"""Child process for python/tests/test_crash_safety.py: writes stores through ``tensorstream._core`` so that the
parent can kill it, limit its file size, drop its privileges or race it against its siblings.

It deliberately imports neither torch nor the test module: start-up has to be fast (the crash test starts ~50
of these), and the parent produces the tensor bytes. A "model" is a directory holding ``spec.json`` (blocks →
tensors with dtype, shape, offset, nbytes) and one ``<version>.bin`` per version with the tensors' raw bytes at
those offsets.

Every mode reports on stdout, one line per event (flushed at once, so a SIGKILL loses nothing already printed):
plain words for progress (``ready``, ``begin``, ``done``) and a final ``result <json>`` line.

Usage: python crash_writer.py MODE --root DIR [options]   (see ``main``)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE)))  # python/ (the package), whatever PYTHONPATH says

from tensorstream import _core  # noqa: E402
from tensorstream.errors import IoError, TensorStreamError  # noqa: E402


def say(*words: object) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def result(**fields: object) -> None:
    say("result", json.dumps(fields, sort_keys=True))


def error_fields(error: BaseException) -> dict:
    return {
        "type": type(error).__name__,
        "module": type(error).__module__,
        "is_tensorstream": isinstance(error, TensorStreamError),
        "is_io_error": isinstance(error, IoError),
        "is_oserror": isinstance(error, OSError),
        "errno": getattr(error, "errno", None),
        "filename": getattr(error, "filename", None),
        "path": getattr(error, "path", None),
        "message": str(error),
    }


class Model:
    """The tensors of one version of a model, loaded from the parent's files into one writable buffer."""

    def __init__(self, model_dir: str, version: str) -> None:
        with open(os.path.join(model_dir, "spec.json")) as f:
            self.blocks = json.load(f)["blocks"]
        with open(os.path.join(model_dir, version + ".bin"), "rb") as f:
            self.buffer = bytearray(f.read())
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer)) if self.buffer else 0
        self.version = version

    def write(self, storage, model_id: str, *, chunk_size: int, level: int, replace: bool,
              between_blocks=None) -> dict:
        writer = _core.StoreWriter(storage, model_id, chunk_size=chunk_size, compression_level=level,
                                   replace=replace)
        try:
            for i, block in enumerate(self.blocks):
                if between_blocks is not None:
                    between_blocks(i)
                writer.begin_block(block["name"])
                for t in block["tensors"]:
                    address = self.base + t["offset"] if t["nbytes"] else 0
                    writer.add_tensor(t["name"], t["dtype"], t["shape"], address, t["nbytes"])
            return writer.commit()
        finally:
            # Not left to the garbage collector: the temp directory goes with the writer.
            del writer


def tmp_entries(root: str) -> list:
    return sorted(os.listdir(os.path.join(root, "tmp")))


def drop_privileges(uid: int) -> None:
    # The interpreter lives under /root (mode 0700), so the parent cannot exec it as another user through
    # preexec_fn; the child drops to `uid` itself once its imports are done, before it touches the store.
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# ---- modes -------------------------------------------------------------------------------------------------------

def mode_loop(args) -> None:
    """Writes versions A and B alternately (compression cycling through --levels) until killed or --count."""
    storage = _core.StorageDirectory.open_or_create(args.root)
    models = {v: Model(args.model_dir, v) for v in ("A", "B")}
    levels = [int(x) for x in args.levels.split(",")]
    version = args.start_version
    say("ready")
    i = 0
    while args.count == 0 or i < args.count:
        level = levels[i % len(levels)]
        say("begin", i, version, level)
        t0 = time.perf_counter()
        marks = {}

        def mark(block_index, _t0=t0, _marks=marks):
            if block_index == 0:
                _marks["first_block"] = time.perf_counter() - _t0

        out = models[version].write(storage, args.model, chunk_size=args.chunk_size, level=level, replace=True,
                                    between_blocks=mark)
        total = time.perf_counter() - t0
        say("done", i, version, level, out["outcome"], f"{total:.6f}")
        i += 1
        version = "B" if version == "A" else "A"


def mode_measure(args) -> None:
    """Times the phases of --count writes: before commit() and commit() itself."""
    storage = _core.StorageDirectory.open_or_create(args.root)
    models = {v: Model(args.model_dir, v) for v in ("A", "B")}
    levels = [int(x) for x in args.levels.split(",")]
    timings = []
    version = args.start_version
    for i in range(args.count):
        level = levels[i % len(levels)]
        model = models[version]
        t0 = time.perf_counter()
        writer = _core.StoreWriter(storage, args.model, chunk_size=args.chunk_size, compression_level=level,
                                   replace=True)
        for block in model.blocks:
            writer.begin_block(block["name"])
            for t in block["tensors"]:
                address = model.base + t["offset"] if t["nbytes"] else 0
                writer.add_tensor(t["name"], t["dtype"], t["shape"], address, t["nbytes"])
        t1 = time.perf_counter()
        out = writer.commit()
        t2 = time.perf_counter()
        del writer
        t3 = time.perf_counter()
        timings.append({"level": level, "version": version, "data": t1 - t0, "commit": t2 - t1,
                        "destroy": t3 - t2, "outcome": out["outcome"], "stored_bytes": out["stored_bytes"]})
        version = "B" if version == "A" else "A"
    result(timings=timings)


def mode_limited(args) -> None:
    """Writes one model under RLIMIT_FSIZE = --limit and reports the error (a full disk, as EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    storage = _core.StorageDirectory.open_or_create(args.root)
    model = Model(args.model_dir, args.start_version)
    resource.setrlimit(resource.RLIMIT_FSIZE, (args.limit, args.limit))
    writer = _core.StoreWriter(storage, args.model, chunk_size=args.chunk_size, compression_level=args.level,
                               replace=False)
    temp_while_alive = None
    try:
        for block in model.blocks:
            writer.begin_block(block["name"])
            for t in block["tensors"]:
                address = model.base + t["offset"] if t["nbytes"] else 0
                writer.add_tensor(t["name"], t["dtype"], t["shape"], address, t["nbytes"])
        out = writer.commit()
    except Exception as error:  # noqa: BLE001 - reported to the parent, which judges it
        temp_while_alive = tmp_entries(args.root)  # the failed writer object is still alive here
        del writer
        result(ok=False, error=error_fields(error), tmp_while_writer_alive=temp_while_alive,
               tmp_after_writer_deleted=tmp_entries(args.root))
        return
    del writer
    result(ok=True, commit=out, tmp_after_writer_deleted=tmp_entries(args.root))


def mode_open(args) -> None:
    """open_or_create --root (optionally as --uid), then optionally write --model; reports what failed where."""
    if args.uid is not None:
        try:
            drop_privileges(args.uid)
        except OSError as error:
            result(stage="drop", error=error_fields(error), euid=os.geteuid(), premise=None)
            return
        existing = os.path.abspath(args.root)
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        probe = os.path.join(existing, f".probe-{os.getpid()}")
        try:  # the premise of the test: this process really cannot write there
            os.mkdir(probe)
            os.rmdir(probe)
            premise = "writable"
        except PermissionError:
            premise = "denied"
        except OSError as e:
            premise = f"other: {e!r}"
    else:
        premise = None
    info = {"euid": os.geteuid(), "premise": premise}
    try:
        storage = _core.StorageDirectory.open_or_create(args.root)
    except Exception as error:  # noqa: BLE001
        result(stage="open", error=error_fields(error), **info)
        return
    info["store_id"] = storage.store_id
    if args.model:
        model = Model(args.model_dir, args.start_version)
        try:
            out = model.write(storage, args.model, chunk_size=args.chunk_size, level=args.level, replace=False)
        except Exception as error:  # noqa: BLE001
            result(stage="write", error=error_fields(error), **info)
            return
        info["commit"] = out
    result(stage="ok", **info)


def wait_for_go() -> None:
    say("ready")
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")


def mode_race_write(args) -> None:
    """After 'go' on stdin: writes the model with replace=False and reports the outcome."""
    storage = _core.StorageDirectory.open_or_create(args.root)
    model = Model(args.model_dir, args.start_version)
    wait_for_go()
    try:
        out = model.write(storage, args.model, chunk_size=args.chunk_size, level=args.level, replace=False)
    except Exception as error:  # noqa: BLE001
        result(ok=False, error=error_fields(error))
        return
    result(ok=True, commit=out)


def mode_race_create(args) -> None:
    """After 'go' on stdin: open_or_create of a storage directory that may not exist yet; reports its id."""
    wait_for_go()
    try:
        storage = _core.StorageDirectory.open_or_create(args.root)
    except Exception as error:  # noqa: BLE001
        result(ok=False, error=error_fields(error))
        return
    result(ok=True, store_id=storage.store_id)


def mode_pause(args) -> None:
    """Writes half of the blocks, says 'paused' and waits (to be inspected, then killed) with its temp dir open."""
    storage = _core.StorageDirectory.open_or_create(args.root)
    model = Model(args.model_dir, args.start_version)
    writer = _core.StoreWriter(storage, args.model, chunk_size=args.chunk_size, compression_level=args.level,
                               replace=True)
    for block in model.blocks[: max(1, len(model.blocks) // 2)]:
        writer.begin_block(block["name"])
        for t in block["tensors"]:
            address = model.base + t["offset"] if t["nbytes"] else 0
            writer.add_tensor(t["name"], t["dtype"], t["shape"], address, t["nbytes"])
    say("paused")
    sys.stdin.readline()
    time.sleep(3600)


MODES = {
    "loop": mode_loop,
    "measure": mode_measure,
    "limited": mode_limited,
    "open": mode_open,
    "race-write": mode_race_write,
    "race-create": mode_race_create,
    "pause": mode_pause,
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--root", required=True, help="storage directory")
    p.add_argument("--model", default="crash-model", help="model id ('' = content-addressed fp-<fingerprint>)")
    p.add_argument("--model-dir", help="directory with spec.json and A.bin / B.bin")
    p.add_argument("--start-version", default="A", choices=["A", "B"])
    p.add_argument("--chunk-size", type=int, default=64 * 1024)
    p.add_argument("--level", type=int, default=0, help="compression level (single-write modes)")
    p.add_argument("--levels", default="0,5,1", help="compression levels to cycle through (loop, measure)")
    p.add_argument("--count", type=int, default=0, help="writes to do (loop: 0 = until killed)")
    p.add_argument("--limit", type=int, default=0, help="RLIMIT_FSIZE in bytes (limited)")
    p.add_argument("--uid", type=int, default=None, help="drop to this uid/gid before opening (open)")
    args = p.parse_args(argv)
    MODES[args.mode](args)


if __name__ == "__main__":
    main()

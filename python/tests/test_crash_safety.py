"""Crash safety of the store (DESIGN.md §5, docs/format.md §1 "Publishing"): a writer killed at any moment, a full
disk, an unwritable directory, and concurrent writers never leave a partial or mixed model, and everything a
dead writer leaves behind is removed by cleanup_orphans.

The writers run as child processes (``crash_writer.py``) that only import ``tensorstream._core``; this module
produces their tensor bytes with torch and checks the results bit for bit.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tensorstream import _core  # noqa: E402
from tensorstream.errors import IoError  # noqa: E402

HERE = Path(__file__).resolve().parent
WRITER = HERE / "crash_writer.py"
PYTHON_DIR = HERE.parent
KIB = 1024
MIB = 1024 * 1024
CRASH_RUNS = int(os.environ.get("TS_CRASH_RUNS", "100"))


# ---- model fixtures --------------------------------------------------------------------------------------------

# A few MiB over several blocks, with dtypes that do and do not get byte grouping, sizes that are not multiples of
# the chunk size or the alignment, a scalar and an empty tensor.
CRASH_SPEC = [
    ("embed", [("embed.weight", "bfloat16", [512, 512])]),
    *[
        (f"layers.{i}", [
            (f"layers.{i}.attn.weight", "bfloat16", [384, 512]),
            (f"layers.{i}.mlp.weight", "float16", [300, 257]),
            (f"layers.{i}.norm.weight", "float32", [1000]),
            (f"layers.{i}.steps", "int64", [3]),
        ])
        for i in range(6)
    ],
    ("head", [
        ("head.weight", "bfloat16", [256, 512]),
        ("head.scale", "float32", []),
        ("head.empty", "float32", [0, 4]),
    ]),
]

SMALL_SPEC = [(f"b{i}", [(f"b{i}.w", "bfloat16", [256, 256]), (f"b{i}.v", "float32", [777])]) for i in range(4)]


def tensor_for(dtype: str, shape: list, gen: torch.Generator) -> torch.Tensor:
    dt = getattr(torch, dtype)
    if dt.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dt)
    if dt == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    low = 0 if dt == torch.uint8 else -100
    return torch.randint(low, 100, shape, generator=gen, dtype=dt)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def make_model(directory: Path, spec, seeds=(("A", 1), ("B", 2))) -> dict:
    """Writes spec.json and <version>.bin for each version; returns {version: {tensor name: bytes}}."""
    directory.mkdir(parents=True, exist_ok=True)
    blocks = []
    versions = {}
    for version, seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        payload = bytearray()
        tensors = {}
        blocks = []
        for block_name, tensor_specs in spec:
            entries = []
            for name, dtype, shape in tensor_specs:
                raw = tensor_bytes(tensor_for(dtype, shape, gen))
                entries.append({"name": name, "dtype": dtype, "shape": shape, "offset": len(payload),
                                "nbytes": len(raw)})
                payload += raw
                tensors[name] = raw
            blocks.append({"name": block_name, "tensors": entries})
        (directory / f"{version}.bin").write_bytes(bytes(payload))
        versions[version] = tensors
    (directory / "spec.json").write_text(json.dumps({"blocks": blocks}))
    return versions


def model_bytes(versions: dict) -> int:
    return sum(len(b) for b in next(iter(versions.values())).values())


# ---- helpers ---------------------------------------------------------------------------------------------------

def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PYTHON_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def writer_cmd(mode: str, root: Path, *args: str) -> list:
    return [sys.executable, str(WRITER), mode, "--root", str(root), *args]


def run_writer(mode: str, root: Path, *args: str, timeout: float = 60) -> dict:
    proc = subprocess.run(writer_cmd(mode, root, *args), capture_output=True, text=True, env=child_env(),
                          timeout=timeout)
    return parse_result(proc.stdout, proc.stderr, proc.returncode)


def parse_result(stdout: str, stderr: str, returncode: int) -> dict:
    for line in stdout.splitlines():
        if line.startswith("result "):
            return json.loads(line[len("result "):])
    raise AssertionError(f"child gave no result (rc={returncode})\nstdout:\n{stdout}\nstderr:\n{stderr}")


def read_line(proc: subprocess.Popen) -> str:
    """One line of an unbuffered (bufsize=0) stdout pipe, read without read-ahead: what follows stays in the pipe
    for communicate(), which reads the file descriptor directly and would miss anything a buffered reader took."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = proc.stdout.read(1)
        if not byte:
            break
        line += byte
    return line.decode().strip()


def tmp_entries(root: Path) -> list:
    return sorted(os.listdir(root / "tmp"))


def read_model(root: Path, model_id: str) -> dict:
    """{tensor name: (dtype, shape, bytes)} of a published model, read through StoreReader with checksums on."""
    storage = _core.StorageDirectory.open_existing(str(root))
    reader = _core.StoreReader.open(storage, model_id)
    out = {}
    for info in reader.tensors():
        buf = bytearray(info["nbytes"])
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if buf else 0
        reader.read_tensor(info["index"], address, info["nbytes"], True)
        out[info["name"]] = (info["dtype"], list(info["shape"]), bytes(buf))
    return out


def matching_version(root: Path, model_id: str, versions: dict, spec) -> str | None:
    """The version whose every tensor equals the published model bit for bit, or None."""
    got = read_model(root, model_id)
    expected_meta = {name: (dtype, list(shape)) for _, ts in spec for name, dtype, shape in ts}
    assert {n: (d, s) for n, (d, s, _) in got.items()} == expected_meta
    for version, tensors in versions.items():
        if all(got[name][2] == raw for name, raw in tensors.items()):
            return version
    return None


def verify_ok(root: Path, model_id: str | None = None) -> dict:
    report = _core.verify_storage(str(root), model_id)
    assert report["ok"], json.dumps(report, indent=1)
    return report


def write_in_process(root: Path, model_dir: Path, version: str, model_id: str, *, level: int = 0,
                     chunk_size: int = 64 * KIB, replace: bool = True) -> dict:
    sys.path.insert(0, str(HERE))
    try:
        import crash_writer
    finally:
        sys.path.remove(str(HERE))
    storage = _core.StorageDirectory.open_or_create(str(root))
    return crash_writer.Model(str(model_dir), version).write(storage, model_id, chunk_size=chunk_size,
                                                               level=level, replace=replace)


def is_root() -> bool:
    return os.geteuid() == 0


# ---- SIGKILL at random moments ---------------------------------------------------------------------------------

def measure_write(root: Path, model_dir: Path, model_id: str, levels: list, repeats: int = 3) -> dict:
    """Median seconds per compression level of (before commit, commit) for the first write of a fresh child, which
    is what a killed child does (a warmed-up process writes faster)."""
    per_level = {}
    for level in levels:
        rows = [run_writer("measure", root, "--model", model_id, "--model-dir", str(model_dir), "--levels",
                           str(level), "--count", "1", timeout=120)["timings"][0] for _ in range(repeats)]
        per_level[level] = (statistics.median(r["data"] for r in rows), statistics.median(r["commit"] for r in rows))
    return per_level


def parse_progress(stdout: str):
    """(last completed version or None, version in progress or None, number of completed writes)."""
    last_done, in_progress, done = None, None, 0
    for line in stdout.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "begin":
            in_progress = words[2]
        elif words[0] == "done":
            last_done, in_progress, done = words[2], None, done + 1
    return last_done, in_progress, done


def classify_tmp(root: Path) -> str:
    entries = tmp_entries(root)
    if not entries:
        return "clean"
    kinds = []
    for name in entries:
        files = sorted(os.listdir(root / "tmp" / name)) if (root / "tmp" / name).is_dir() else ["<file>"]
        kinds.append("temp+manifest" if "manifest" in files else "temp-partial")
    return ",".join(sorted(set(kinds)))


def test_sigkill_at_random_moments(tmp_path):
    started = time.monotonic()
    root, model_dir, model_id = tmp_path / "store", tmp_path / "model", "crash-model"
    versions = make_model(model_dir, CRASH_SPEC)
    assert model_bytes(versions) > 3 * MIB
    levels = [0, 5, 1]
    chunk = 64 * KIB

    timings = measure_write(root, model_dir, model_id, levels)
    # The measurement left a good version behind; which one is read back, as after every kill.
    shutil.rmtree(root)
    write_in_process(root, model_dir, "A", model_id, chunk_size=chunk)
    current = "A"
    verify_ok(root, model_id)

    rng = random.Random(20240531)
    stats = {"runs": 0, "published_new": 0, "kept_old": 0, "completed_writes": 0, "in_commit": 0}
    tmp_kinds: dict = {}
    windows: dict = {}
    for run in range(CRASH_RUNS):
        rotated = levels[run % len(levels):] + levels[:run % len(levels)]
        data_s, commit_s = timings[rotated[0]]
        total = data_s + commit_s
        pick = rng.random()
        if pick < 0.4:  # anywhere in the first write
            window, delay = "first-write", rng.uniform(0, total)
        elif pick < 0.8:  # right around commit: fsync, manifest, rename(-exchange), fsync of models/
            window, delay = "commit", rng.uniform(max(0.0, data_s - 0.3 * commit_s), data_s + 1.5 * commit_s)
        else:  # a later write, or between writes
            window, delay = "later", rng.uniform(total, 3 * total)
        windows[window] = windows.get(window, 0) + 1

        start_version = "B" if current == "A" else "A"  # the first write always changes the content
        proc = subprocess.Popen(
            writer_cmd("loop", root, "--model", model_id, "--model-dir", str(model_dir), "--chunk-size", str(chunk),
                       "--levels", ",".join(map(str, rotated)), "--start-version", start_version),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=child_env())
        try:
            ready = read_line(proc)
            assert ready == "ready", (ready, proc.stderr.read() if proc.poll() is not None else "")
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            rest, err = (b.decode() for b in proc.communicate(timeout=30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"writer ended on its own (rc={proc.returncode}): {err}"
        last_done, in_progress, done = parse_progress(rest)
        stats["completed_writes"] += done
        before_kill = last_done or current  # what must be there at least

        context = f"run {run} ({window}, delay {delay * 1000:.1f} ms, levels {rotated}, output {rest!r})"
        # Never a partial model: the id is there (it was replaced atomically, never removed), complete, valid.
        assert sorted(os.listdir(root / "models")) == [model_id], context
        assert sorted(os.listdir(root / "models" / model_id)) == ["data", "manifest"], context
        report = _core.verify_storage(str(root), model_id)
        assert report["ok"], f"{context}\n{json.dumps(report, indent=1)}"
        found = matching_version(root, model_id, versions, CRASH_SPEC)
        assert found in {before_kill, in_progress} - {None}, f"{context}: found {found}"
        stats["kept_old" if found == before_kill else "published_new"] += 1

        kind = classify_tmp(root)
        tmp_kinds[kind] = tmp_kinds.get(kind, 0) + 1
        # Killed inside commit: its manifest was written (temp dir with a manifest: before the rename, or the old
        # model after the exchange), or the new version was published but the writer never said "done".
        stats["in_commit"] += "manifest" in kind or found != before_kill
        cleanup = _core.cleanup_orphans(str(root), False)
        assert cleanup["kept_in_use"] == [], (context, cleanup)
        assert tmp_entries(root) == [], (context, cleanup)
        assert sorted(os.listdir(root / "models")) == [model_id], context
        stats["runs"] += 1
        current = found

    after = verify_ok(root)
    assert after["orphans"] == []
    elapsed = time.monotonic() - started
    print(f"\ncrash runs: {stats}; kill windows: {windows}; tmp/ after kill: {tmp_kinds}; "
          f"write timings (data s, commit s) by level: {timings}; {elapsed:.1f} s")
    assert stats["runs"] >= min(CRASH_RUNS, 50)
    # The kills did land inside writes (a dead writer's temp directory was there to clean up), and some runs
    # finished whole writes before dying.
    assert any(k != "clean" for k in tmp_kinds), tmp_kinds
    assert stats["in_commit"] > 0, stats
    assert stats["completed_writes"] > 0, stats


def test_cleanup_keeps_a_live_writers_temp_dir(tmp_path):
    root, model_dir = tmp_path / "store", tmp_path / "model"
    versions = make_model(model_dir, SMALL_SPEC)
    write_in_process(root, model_dir, "A", "m")
    proc = subprocess.Popen(writer_cmd("pause", root, "--model", "m", "--model-dir", str(model_dir),
                                       "--start-version", "B"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                            env=child_env())
    try:
        assert read_line(proc) == "paused", proc.stderr.read() if proc.poll() is not None else ""
        live = tmp_entries(root)
        assert len(live) == 1 and live[0].startswith("m."), live
        dry = _core.verify_storage(str(root))
        assert dry["ok"] and dry["orphans"] == [], dry
        kept = _core.cleanup_orphans(str(root), False)
        assert kept["removed"] == [] and [os.path.basename(p) for p in kept["kept_in_use"]] == live, kept
        assert tmp_entries(root) == live
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    gone = _core.cleanup_orphans(str(root), False)
    assert [os.path.basename(p) for p in gone["removed"]] == live and gone["bytes_freed"] > 0, gone
    assert tmp_entries(root) == []
    verify_ok(root, "m")
    assert matching_version(root, "m", versions, SMALL_SPEC) == "A"


# ---- full disk -------------------------------------------------------------------------------------------------

# (spec, RLIMIT_FSIZE, compression level, which file must be named, what fails)
def _efbig_cases():
    # commit-time: one chunk of 3 pages + 100 bytes fits the limit exactly; commit's ftruncate to the 4 KiB
    # aligned data size then exceeds it.
    odd = [("only", [("only.bytes", "uint8", [3 * 4096 + 100])])]
    # manifest: 200 one-byte tensors with 1000-byte names make a ~50 KiB data file and a ~230 KiB manifest.
    many = [("blk", [(f"t{i:04d}." + "n" * 990, "uint8", [1]) for i in range(200)])]
    return {
        "data-mid-chunk": (CRASH_SPEC, MIB + 12345, 0, "data"),
        "data-compressed": (CRASH_SPEC, 300 * KIB + 7, 5, "data"),
        "data-at-commit-truncate": (odd, 3 * 4096 + 100, 0, "data"),
        "manifest": (many, 64 * KIB, 0, "manifest"),
    }


@pytest.mark.parametrize("case", sorted(_efbig_cases()))
def test_full_disk_efbig(tmp_path, case):
    spec, limit, level, named = _efbig_cases()[case]
    root = tmp_path / "store"
    good_dir, big_dir = tmp_path / "good", tmp_path / "big"
    good = make_model(good_dir, SMALL_SPEC)
    make_model(big_dir, spec, seeds=(("A", 7),))
    write_in_process(root, good_dir, "A", "earlier")
    verify_ok(root, "earlier")

    out = run_writer("limited", root, "--model", "too-big", "--model-dir", str(big_dir), "--limit", str(limit),
                     "--level", str(level))
    assert not out["ok"], f"the write under RLIMIT_FSIZE={limit} succeeded: {out}"
    error = out["error"]
    assert error["is_io_error"] and error["module"] == IoError.__module__, error
    assert error["is_tensorstream"] and error["is_oserror"], error
    assert error["errno"] == errno.EFBIG, error
    path = error["filename"]
    assert path and os.path.basename(path) == named, error
    assert Path(path).parent.parent == root / "tmp", error  # the writer's file, in its temp directory
    assert path in error["message"] and "EFBIG" in error["message"], error
    # Nothing of the failed write remains, the earlier model is untouched.
    assert out["tmp_after_writer_deleted"] == [], out
    assert tmp_entries(root) == []
    assert sorted(os.listdir(root / "models")) == ["earlier"]
    report = verify_ok(root)
    assert report["orphans"] == []
    assert matching_version(root, "earlier", good, SMALL_SPEC) == "A"


def test_full_disk_temp_removed_when_the_error_is_raised(tmp_path):
    root, good_dir, big_dir = tmp_path / "store", tmp_path / "good", tmp_path / "big"
    make_model(good_dir, SMALL_SPEC)
    make_model(big_dir, CRASH_SPEC, seeds=(("A", 7),))
    write_in_process(root, good_dir, "A", "earlier")
    out = run_writer("limited", root, "--model", "too-big", "--model-dir", str(big_dir), "--limit", str(MIB))
    assert not out["ok"], out
    assert out["tmp_while_writer_alive"] == [], out


@pytest.fixture
def small_tmpfs():
    if not is_root():
        pytest.skip("mounting a tmpfs for a real ENOSPC needs root")
    base = Path(tempfile.mkdtemp(prefix="ts-tmpfs-"))
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(base)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        base.rmdir()
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (mount -t tmpfs: {mount.stderr.strip()})")
    try:
        yield base
    finally:
        subprocess.run(["umount", str(base)], check=False)
        base.rmdir()


def test_full_disk_enospc_on_tmpfs(small_tmpfs, tmp_path):
    root, good_dir, big_dir = small_tmpfs / "store", tmp_path / "good", tmp_path / "big"
    good = make_model(good_dir, SMALL_SPEC)
    make_model(big_dir, CRASH_SPEC, seeds=(("A", 7),))
    write_in_process(root, good_dir, "A", "earlier")
    verify_ok(root, "earlier")
    with pytest.raises(IoError) as info:
        write_in_process(root, big_dir, "A", "too-big", replace=False)
    error = info.value
    assert error.errno == errno.ENOSPC, error
    assert error.filename and os.path.basename(error.filename) == "data", error
    assert Path(error.filename).parent.parent == root / "tmp", error
    assert error.filename in str(error) and "ENOSPC" in str(error), error
    assert tmp_entries(root) == []
    assert sorted(os.listdir(root / "models")) == ["earlier"]
    assert verify_ok(root)["orphans"] == []
    assert matching_version(root, "earlier", good, SMALL_SPEC) == "A"
    # The space came back: a model that fits can still be written.
    write_in_process(root, good_dir, "B", "later", replace=False)
    verify_ok(root)


# ---- unwritable paths ------------------------------------------------------------------------------------------

NOBODY = 65534


@pytest.fixture
def root_owned_dir():
    """A root-owned 0755 directory that `nobody` can reach (pytest's tmp_path is 0700)."""
    if not is_root():
        pytest.skip("needs root: it drops a child to uid 65534 to meet a root-owned 0755 directory")
    base = Path(tempfile.mkdtemp(prefix="ts-unwritable-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(root: Path, *args: str) -> dict:
    out = run_writer("open", root, "--uid", str(NOBODY), *args)
    if out.get("stage") == "drop":
        pytest.skip(f"could not drop to uid {NOBODY}: {out}")
    assert out["euid"] == NOBODY and out["premise"] == "denied", out  # it really cannot write there
    return out


def _assert_eacces(out: dict, stage: str, under: Path) -> None:
    assert out["stage"] == stage, out
    error = out["error"]
    assert error["is_io_error"] and error["is_oserror"], error
    assert error["errno"] == errno.EACCES, error
    assert error["filename"] and Path(error["filename"]).is_relative_to(under), error
    assert error["filename"] in error["message"] and "EACCES" in error["message"], error


def test_unwritable_existing_directory(root_owned_dir):
    storage = root_owned_dir / "empty"
    storage.mkdir(mode=0o755)
    _assert_eacces(_as_nobody(storage), "open", storage)
    assert os.listdir(storage) == []


def test_unwritable_parent_of_a_new_storage(root_owned_dir):
    parent = root_owned_dir / "parent"
    parent.mkdir(mode=0o755)
    storage = parent / "new" / "store"
    _assert_eacces(_as_nobody(storage), "open", parent / "new")
    assert os.listdir(parent) == []


def test_unwritable_existing_storage(root_owned_dir, tmp_path):
    storage = root_owned_dir / "store"
    make_model(tmp_path / "m", SMALL_SPEC)
    shutil.copytree(tmp_path / "m", root_owned_dir / "m")
    os.chmod(root_owned_dir / "m", 0o755)
    write_in_process(storage, root_owned_dir / "m", "A", "earlier")
    store_id = _core.StorageDirectory.open_existing(str(storage)).store_id
    out = _as_nobody(storage, "--model", "mine", "--model-dir", str(root_owned_dir / "m"))
    # Opening a store one may only read is fine (readers need nothing more); writing into it is not.
    _assert_eacces(out, "write", storage / "tmp")
    assert out["store_id"] == store_id
    assert tmp_entries(storage) == []
    assert sorted(os.listdir(storage / "models")) == ["earlier"]
    verify_ok(storage)


def test_storage_path_is_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a store")
    with pytest.raises(IoError) as info:
        _core.StorageDirectory.open_or_create(str(afile))
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST), info.value
    assert info.value.filename == str(afile) and str(afile) in str(info.value)
    with pytest.raises(IoError) as info:
        _core.StorageDirectory.open_or_create(str(afile / "store"))
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST), info.value
    assert str(afile) in info.value.filename and info.value.filename in str(info.value)
    assert afile.read_bytes() == b"not a store"


# ---- concurrency -----------------------------------------------------------------------------------------------

def race(mode: str, roots_and_args: list, timeout: float = 120) -> list:
    """Starts one child per (root, args), waits until all are ready, releases them at once, returns results."""
    procs = [subprocess.Popen(writer_cmd(mode, root, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, bufsize=0, env=child_env())
             for root, args in roots_and_args]
    try:
        for p in procs:
            line = read_line(p)
            assert line == "ready", (line, p.stderr.read() if p.poll() is not None else "")
        for p in procs:
            p.stdin.write(b"go\n")
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(parse_result(out.decode(), err.decode(), p.returncode))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("model_id", ["shared-model", ""], ids=["named", "content-addressed"])
def test_concurrent_writers_of_the_same_model(tmp_path, model_id):
    model_dir = tmp_path / "model"
    versions = make_model(model_dir, SMALL_SPEC + CRASH_SPEC[:3])
    spec = SMALL_SPEC + CRASH_SPEC[:3]
    for round_ in range(3):
        root = tmp_path / f"store{round_}"
        _core.StorageDirectory.open_or_create(str(root))
        results = race("race-write", [(root, ["--model", model_id, "--model-dir", str(model_dir),
                                              "--level", str(5 * (i % 2))]) for i in range(4)])
        assert all(r["ok"] for r in results), results
        outcomes = sorted(r["commit"]["outcome"] for r in results)
        assert outcomes == ["already_existed"] * 3 + ["published"], results
        ids = {r["commit"]["model_id"] for r in results}
        fingerprints = {r["commit"]["fingerprint"] for r in results}
        assert len(ids) == 1 and len(fingerprints) == 1, results
        (published,) = ids
        if model_id:
            assert published == model_id
        else:
            assert published == "fp-" + next(iter(fingerprints))
        assert os.listdir(root / "models") == [published]
        assert tmp_entries(root) == []
        assert verify_ok(root)["orphans"] == []
        assert matching_version(root, published, versions, spec) == "A"


def test_concurrent_creation_of_a_storage_directory(tmp_path):
    for round_ in range(5):
        root = tmp_path / f"new{round_}" / "store"
        results = race("race-create", [(root, []) for _ in range(4)])
        assert all(r["ok"] for r in results), results
        ids = {r["store_id"] for r in results}
        assert len(ids) == 1, results
        assert _core.StorageDirectory.open_existing(str(root)).store_id == ids.pop()
        assert (root / "STORE").stat().st_size == 40
        assert tmp_entries(root) == []  # the losing candidates were unlinked
        assert sorted(os.listdir(root)) == ["STORE", "locks", "models", "tmp"]

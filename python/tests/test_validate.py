"""The production validation suite: ``tensorstream.validate.run_validation`` and ``tensorstream validate``."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections import namedtuple

import pytest

import tensorstream as ts
from tensorstream import validate

PACKAGE_ROOT = str(pathlib.Path(os.path.abspath(ts.__file__)).parents[1])


def run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("TENSORSTREAM_STORAGE_PATH", None)
    return subprocess.run([sys.executable, "-m", "tensorstream", "validate", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def by_name(checks):
    return {(c.group, c.name): c for c in checks}


def leftovers(path: pathlib.Path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith(".tensorstream-validate"))


def test_environment_and_storage_pass_on_a_tmp_directory(storage_path):
    checks = validate.run_validation(storage_path, read_test_bytes=8 << 20, model_check=False)
    assert validate.passed(checks), validate.format_table(checks)
    rows = by_name(checks)
    for key in [("environment", "python"), ("environment", "torch"), ("environment", "_core extension"),
                ("storage", "path"), ("storage", "writable"), ("storage", "free space")]:
        assert rows[key].status == validate.PASS, rows[key]
    assert rows[("environment", "io_uring")].status == validate.INFO
    assert rows[("environment", "cpus")].value >= 1
    read = rows[("storage", "read speed")]
    assert read.status in (validate.PASS, validate.INFO) and read.value > 0
    assert "MB/s" in read.detail
    assert "created" in rows[("storage", "path")].detail
    assert storage_path.is_dir() and leftovers(storage_path) == []


def test_storage_under_a_regular_file_fails_and_names_the_cause(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    checks = validate.run_validation(blocker / "store", read_test_bytes=8 << 20)
    assert not validate.passed(checks)
    failed = [c for c in checks if c.failed]
    assert [(c.group, c.name) for c in failed] == [("storage", "path")]
    assert "Not a directory" in failed[0].detail and str(blocker) in failed[0].detail
    rows = by_name(checks)
    assert rows[("storage", "writable")].status == validate.INFO  # skipped, not another FAIL
    assert rows[("model", "end to end")].status == validate.INFO
    assert "unusable" in rows[("model", "end to end")].detail


def test_storage_path_that_is_a_file_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    checks = validate.run_validation(blocker, read_test_bytes=0, model_check=False)
    failed = [c for c in checks if c.failed]
    assert [(c.group, c.name) for c in failed] == [("storage", "path")]
    assert f"{blocker} is a file" in failed[0].detail


def test_too_little_free_space_fails(storage_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    small = usage(10 << 30, (10 << 30) - (512 << 20), 512 << 20)
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda path: small)
    checks = validate.run_validation(storage_path, read_test_bytes=8 << 20, model_check=False)
    rows = by_name(checks)
    assert rows[("storage", "free space")].status == validate.FAIL
    assert "512.0 MiB free" in rows[("storage", "free space")].detail
    assert rows[("storage", "read speed")].status == validate.INFO
    assert not validate.passed(checks)


def test_missing_offload_is_a_failure(storage_path, monkeypatch):
    def missing():
        raise ImportError("no module named tensorstream.torch")

    monkeypatch.setattr(validate, "_offload_api", missing)
    checks = validate.run_validation(storage_path, read_test_bytes=0)
    rows = by_name(checks)
    assert rows[("model", "offload")].status == validate.FAIL
    assert "not available" in rows[("model", "offload")].detail


def test_model_end_to_end_passes_and_leaves_nothing(storage_path):
    pytest.importorskip("transformers")
    checks = validate.run_validation(storage_path, read_test_bytes=0)
    assert validate.passed(checks), validate.format_table(checks)
    rows = by_name(checks)
    for name in ("offload", "generate", "integrity"):
        assert rows[("model", name)].status == validate.PASS, rows[("model", name)]
    assert "streamed" in rows[("model", "offload")].detail
    assert len(rows[("model", "generate")].value) == validate.GENERATE_TOKENS
    assert ts.Storage(storage_path).models() == []  # the test model was removed again
    assert leftovers(storage_path) == []


def test_model_already_in_the_store_is_kept(storage_path):
    pytest.importorskip("transformers")
    first = by_name(validate.run_validation(storage_path, read_test_bytes=0))
    model_id = first[("model", "offload")].value
    # Put the same model in the store first: validation must reuse it and leave it there.
    offload = validate._offload_api()[0]
    model = validate.tiny_llama()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    model = offload(model, ts.config.Config(storage_path=str(storage_path), vram_budget_gb=params / 1e9)) or model
    model.cleanup_tensorstream()
    assert ts.Storage(storage_path).models() == [model_id]
    again = validate.run_validation(storage_path, read_test_bytes=0)
    assert validate.passed(again), validate.format_table(again)
    assert ts.Storage(storage_path).models() == [model_id]


def test_cli_passes_with_exit_0(storage_path):
    pytest.importorskip("transformers")
    result = run_cli("--storage", storage_path, "--read-test-mib", 8)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAIL " not in out and "validation passed" in out
    for name in ("python", "torch", "_core extension", "io_uring", "cpus", "ram", "path", "writable", "free space",
                 "read speed", "offload", "generate", "integrity"):
        assert name in out


def test_cli_unwritable_storage_exits_1_and_names_the_cause(tmp_path):
    blocker = tmp_path / "regular-file"
    blocker.write_text("x")
    result = run_cli("--storage", blocker / "store", "--read-test-mib", 8)
    assert result.returncode == 1, result.stdout + result.stderr
    fail_lines = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail_lines) == 1
    assert "path" in fail_lines[0] and "Not a directory" in fail_lines[0] and f"{blocker} is a file" in fail_lines[0]
    assert "validation FAILED" in result.stdout


def test_cli_json(tmp_path):
    blocker = tmp_path / "regular-file"
    blocker.write_text("x")
    result = run_cli("--storage", blocker / "store", "--json", "--no-model")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    statuses = {(c["group"], c["name"]): c["status"] for c in report["checks"]}
    assert statuses[("storage", "path")] == "FAIL" and statuses[("environment", "torch")] == "PASS"

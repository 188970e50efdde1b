"""The ``tensorstream`` command line, run as ``python -m tensorstream`` in a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import tensorstream as ts
from conftest import chunk_map, compressible_bf16, data_path, flip_bit, random_tensor

# The package directory the tests import tensorstream from (the source tree or a private build).
PACKAGE_ROOT = str(pathlib.Path(os.path.abspath(ts.__file__)).parents[1])


def run_cli(*args, env_path=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("TENSORSTREAM_STORAGE_PATH", None)
    if env_path is not None:
        env["TENSORSTREAM_STORAGE_PATH"] = str(env_path)
    return subprocess.run([sys.executable, "-m", "tensorstream", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def store(storage_path):
    ts.write_model(storage_path, {"embed": {"embed.weight": random_tensor((64, 32), torch.float32, seed=1)},
                                  "layer0": {"layer0.w": random_tensor((4000,), torch.float32, seed=2),
                                             "layer0.b": torch.zeros(7, dtype=torch.float16)}},
                   model_id="tiny", chunk_size=4096)
    ts.write_model(storage_path, {"b": {"packed": compressible_bf16(20_000)}}, model_id="packed",
                   compression_level=5)
    return storage_path


def test_inspect_lists_models(store):
    result = run_cli("inspect", store)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "tiny" in out and "packed" in out and "2 model(s)" in out
    assert "compressed" in out  # the packed model's tensors
    as_json = json.loads(run_cli("inspect", store, "--json").stdout)
    models = {m["model"]: m for m in as_json["models"]}
    assert models["tiny"]["tensors"] == 3 and models["tiny"]["blocks"] == 2
    assert models["tiny"]["raw_bytes"] == 64 * 32 * 4 + 4000 * 4 + 14
    assert models["packed"]["compression_ratio"] > 1.0


def test_inspect_one_model(store):
    result = run_cli("inspect", store, "tiny")
    assert result.returncode == 0, result.stderr
    for word in ("embed", "layer0", "embed.weight", "layer0.w", "layer0.b", "float32", "float16", "(64, 32)",
                 "fingerprint"):
        assert word in result.stdout
    detail = json.loads(run_cli("inspect", store, "tiny", "--json").stdout)
    assert [b["name"] for b in detail["blocks"]] == ["embed", "layer0"]
    assert [t["name"] for t in detail["tensors"]] == ["embed.weight", "layer0.w", "layer0.b"]


def test_inspect_missing_model_exits_2(store):
    missing = run_cli("inspect", store, "absent")
    assert missing.returncode == 2 and "absent" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_verify_good_and_corrupt(store):
    good = run_cli("verify", store)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK" in good.stdout
    chunk = [c for c in chunk_map(store, "tiny") if c["tensor"] == "layer0.w"][2]
    flip_bit(data_path(store, "tiny"), chunk["offset"] + 100)
    bad = run_cli("verify", store)
    assert bad.returncode == 1
    assert "layer0.w" in bad.stdout and "tiny" in bad.stdout
    assert "chunk 2" in bad.stdout and f"offset {chunk['offset']}" in bad.stdout
    assert "embed.weight" not in bad.stdout.split("bad chunk")[-1]
    as_json = json.loads(run_cli("verify", store, "--json").stdout)
    assert as_json["ok"] is False
    [entry] = [m for m in as_json["models"] if m["model"] == "tiny"]
    assert [(b["tensor"], b["chunk"], b["offset"]) for b in entry["bad_chunks"]] == [
        ("layer0.w", 2, chunk["offset"])]
    assert run_cli("verify", store, "--model", "packed").returncode == 0
    assert run_cli("verify", "--model", "packed", env_path=store).returncode == 0


def test_cleanup(store):
    leftover = store / "tmp" / "dead.1.abcdef"
    leftover.mkdir()
    (leftover / "data").write_bytes(b"x" * 123)
    dry = run_cli("cleanup", store, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1" in dry.stdout and str(leftover) in dry.stdout
    assert leftover.exists()
    real = run_cli("cleanup", store)
    assert real.returncode == 0 and "removed 1" in real.stdout
    assert not leftover.exists()
    assert ts.verify_storage_integrity(store).ok


def test_defrag(store):
    plain = run_cli("defrag", store)
    assert plain.returncode == 0, plain.stderr
    assert "0 of 2 model(s) rewritten" in plain.stdout
    ts.record_execution_order(store, "tiny", ["layer0", "embed"])
    result = run_cli("defrag", store, "--model", "tiny")
    assert result.returncode == 0, result.stderr
    assert "1 of 1 model(s) rewritten" in result.stdout
    with ts.open_model(store, "tiny") as model:
        assert model.block_names() == ["layer0", "embed"]
    assert ts.verify_storage_integrity(store).ok


def test_defrag_of_corrupt_model_exits_1(store):
    flip_bit(data_path(store, "tiny"), 10)
    ts.record_execution_order(store, "tiny", ["layer0", "embed"])
    result = run_cli("defrag", store, "--model", "tiny")
    assert result.returncode == 1 and "FAILED" in result.stdout


@pytest.mark.parametrize("command", ["inspect", "verify", "cleanup", "defrag"])
def test_nonexistent_path_exits_2_with_one_line(tmp_path, command):
    missing = tmp_path / "nowhere"
    result = run_cli(command, missing)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0] and "error" in lines[0]
    assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_missing_path_argument_and_env(tmp_path):
    result = run_cli("verify")
    assert result.returncode == 2 and "TENSORSTREAM_STORAGE_PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_errors_and_version():
    assert run_cli().returncode == 2  # argparse: a command is required
    assert run_cli("frobnicate").returncode == 2
    version = run_cli("--version")
    assert version.returncode == 0 and ts.__version__ in version.stdout


def test_main_in_process(store, capsys):
    from tensorstream.cli import main

    assert main(["verify", str(store)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["verify"]) == 2  # neither PATH nor TENSORSTREAM_STORAGE_PATH (ConfigError raised in Python)
    assert "TENSORSTREAM_STORAGE_PATH" in capsys.readouterr().err


def test_main_in_process_engine_error(store, capsys):
    from tensorstream.cli import main

    assert main(["inspect", str(store / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


# ---- convert -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def test_convert_writes_the_model_from_pretrained_then_finds(tiny_checkpoint, tmp_path):
    from tensorstream.torch.offload import stored_compression_level

    store = tmp_path / "store"
    first = run_cli("convert", tiny_checkpoint, "--storage-path", store, "--dtype", "bf16", "--compression-level",
                    "5", "--min-layer-size", "0", "--json")
    assert first.returncode == 0, first.stderr
    written = json.loads(first.stdout)
    assert written["outcome"] == "published" and written["model_id"].startswith("tiny-llama-")
    assert written["stored_bytes"] < written["raw_bytes"]
    with ts.open_model(store, written["model_id"]) as model:
        assert {model.info(n)["dtype"] for n in model.tensor_names()} == {"bfloat16"}
        assert stored_compression_level(model) == 5
    again = run_cli("convert", tiny_checkpoint, "-s", store, "--dtype", "bf16", "--compression-level", "5",
                    "--min-layer-size", "0")
    assert again.returncode == 0 and "nothing written" in again.stdout and written["model_id"] in again.stdout
    # from_pretrained with the same settings derives the same id and writes nothing.
    model = ts.from_pretrained(tiny_checkpoint, ts.Config(storage_path=str(store), compression_enabled=True,
                                                         compression_level=5, min_layer_size=0),
                               torch_dtype=torch.bfloat16)
    try:
        from tensorstream.torch.offload import STATE_ATTR

        state = model.__dict__[STATE_ATTR]
        assert state.model_id == written["model_id"] and state.write_outcome == "already_existed"
    finally:
        model.cleanup_tensorstream()
    replaced = run_cli("convert", tiny_checkpoint, "-s", store, "--dtype", "bf16", "--compression-level", "5",
                       "--min-layer-size", "0", "--replace", "--json")
    assert replaced.returncode == 0 and json.loads(replaced.stdout)["outcome"] == "replaced"


def test_convert_errors_exit_2_with_one_line(tiny_checkpoint, tmp_path):
    for args, words in [((tmp_path / "absent",), "does not exist"),
                        ((tiny_checkpoint, "--compression-level", "12"), "outside 0..9"),
                        ((tiny_checkpoint, "--dtype", "int8"), "torch_dtype"),
                        ((tiny_checkpoint, "--model-class", "NoSuchModel"), "not a transformers class")]:
        result = run_cli("convert", *args, "-s", tmp_path / "store")
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr

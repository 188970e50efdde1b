"""examples/demo.py (what ``make demo`` runs), with a tiny model."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import tensorstream as ts

pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo.py"
PACKAGE_ROOT = str(pathlib.Path(os.path.abspath(ts.__file__)).parents[1])


def test_demo_tiny_model_tokens_match(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, str(DEMO), "--size-gib", "0.02", "--storage", str(tmp_path / "store"),
                             "--real", "skip"], capture_output=True, text=True, env=env, timeout=120)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"tokens match plain\s+yes", out), out
    for label in ("tokens/s", "bytes read per token", "cache hit rate", "I/O throughput", "stall time", "peak RSS"):
        assert re.search(rf"^  {re.escape(label)}\s+\S", out, re.MULTILINE), f"{label!r} missing:\n{out}"
    per_token = re.search(r"bytes read per token\s+([\d.]+) [GM]B\s+\(([\d.]+)x the model", out)
    assert per_token and float(per_token.group(2)) > 0, out  # a quarter budget: layers must stream
    assert (tmp_path / "store" / "models").is_dir()


def test_demo_real_model_answers_with_the_plain_models_tokens(tmp_path):
    from tensorstream.testing.real_models import RealModelUnavailable, model_dir

    try:
        model_dir("smollm2")
    except RealModelUnavailable as error:
        pytest.skip(f"real model 'smollm2' unavailable: {error}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, str(DEMO), "--real", "only", "--real-tokens", "12", "--storage",
                             str(tmp_path / "store")], capture_output=True, text=True, env=env, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"tokens match plain\s+yes", out), out
    answer = re.search(r"^  assistant: (.+)$", out, re.MULTILINE)
    assert answer and len(answer.group(1).split()) >= 3, out  # real words from the tokenizer
    assert re.search(r"compressed \(0\.6\d of raw\)", out), out  # trained bf16 under the exponent codec
    for label in ("tokens/s", "bytes read per token", "cache hit rate", "checksum failures"):
        assert re.search(rf"^  {re.escape(label)}\s+\S", out, re.MULTILINE), f"{label!r} missing:\n{out}"


def test_plan_hits_the_size():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from demo import plan_llama
    finally:
        sys.path.remove(str(REPO / "examples"))
    for size_gib, itemsize in ((2.0, 4), (2.0, 2), (0.5, 4), (0.02, 4)):
        plan = plan_llama(size_gib * (1 << 30), itemsize)
        assert abs(plan["weight_bytes"] / (size_gib * (1 << 30)) - 1) < 0.1, plan
        assert plan["num_hidden_layers"] >= 4 and plan["hidden_size"] % plan["num_attention_heads"] == 0
    big = plan_llama(2 * (1 << 30), 4)
    assert (big["hidden_size"], big["num_hidden_layers"], big["vocab_size"]) == (2048, 8, 32000)

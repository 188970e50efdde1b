"""tensorstream.from_pretrained (tensorstream.torch.pretrained): a checkpoint folder to an offloaded model in one
call, bit-identical to transformers' from_pretrained; single and sharded checkpoints; a dtype cast while writing;
the derived model id (a second call writes nothing; another dtype or encoding is another id); hub ids from the
local cache; and a typed error naming file and tensor for a mismatched config, a missing shard or a truncated file,
with no partial store left behind. Real trained checkpoints: test_real_models.py."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import tensorstream as ts  # noqa: E402
from store_faults import state_of  # noqa: E402
from tensorstream.torch.checkpoint import INDEX_NAME, SINGLE_NAME  # noqa: E402
from tensorstream.torch.pretrained import checkpoint_model_id, default_storage_path  # noqa: E402


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A seeded 3-layer Llama saved as transformers saves it (config, generation config, one safetensors file)."""
    from conftest import build_llama

    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    build_llama().save_pretrained(str(path))
    return path


def plain_model(path, dtype=None):
    kwargs = {} if dtype is None else {"dtype": dtype}
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def config(tmp_path, **overrides):
    options = dict(storage_path=str(tmp_path / "store"), min_layer_size=0, num_io_threads=2)
    options.update(overrides)
    return ts.Config(**options)


def store_tmp_is_empty(store) -> bool:
    tmp = store / "tmp"
    return not tmp.exists() or not list(tmp.iterdir())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_matches_transformers_from_pretrained_and_a_second_call_writes_nothing(ts_models, tmp_path,
                                                                               llama_checkpoint, dtype):
    plain = plain_model(llama_checkpoint, dtype)
    model = ts_models.track(ts.from_pretrained(llama_checkpoint, config(tmp_path, vram_budget_gb=0.25 * sum(
        p.numel() * p.element_size() for p in plain.parameters()) / 1e9), torch_dtype=dtype))
    assert type(model) is type(plain) and not model.training
    assert model.dtype == (dtype or torch.float32)
    assert state_of(model).write_outcome == "published"
    assert model.generation_config.to_dict() == plain.generation_config.to_dict()
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(model(ids).logits, plain(ids).logits, "forward")
    ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids), "generate")
    again = ts_models.track(ts.from_pretrained(llama_checkpoint, config(tmp_path), torch_dtype=dtype))
    assert state_of(again).write_outcome == "already_existed"
    assert state_of(again).model_id == state_of(model).model_id
    assert len(ts.Storage(tmp_path / "store")) == 1


def test_sharded_checkpoint_and_a_named_model_class(ts_models, tmp_path):
    from conftest import build_llama

    plain = build_llama().eval()
    plain.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / INDEX_NAME).exists()
    model = ts_models.track(ts.from_pretrained(tmp_path / "sharded", config(tmp_path),
                                               model_class=transformers.LlamaForCausalLM))
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(model(ids).logits, plain(ids).logits, "sharded forward")


def test_the_model_id_follows_checkpoint_dtype_class_and_encoding(llama_checkpoint, tmp_path):
    cls = transformers.LlamaForCausalLM
    base = checkpoint_model_id(str(llama_checkpoint), torch.float32, cls, 0)
    assert base.startswith("tiny-llama-") and ts._core.is_valid_model_id(base)
    assert checkpoint_model_id(str(llama_checkpoint), torch.float32, cls, 0) == base
    others = {checkpoint_model_id(str(llama_checkpoint), torch.bfloat16, cls, 0),
              checkpoint_model_id(str(llama_checkpoint), torch.float32, transformers.LlamaModel, 0),
              checkpoint_model_id(str(llama_checkpoint), torch.float32, cls, 5)}
    assert base not in others and len(others) == 3
    copy = tmp_path / "tiny-llama"
    copy.mkdir()
    for name in os.listdir(llama_checkpoint):
        (copy / name).write_bytes((llama_checkpoint / name).read_bytes())
    os.utime(copy / SINGLE_NAME, ns=(1, 1))  # same name, another modification time: maybe other weights
    assert checkpoint_model_id(str(copy), torch.float32, cls, 0) != base


def test_compression_writes_its_own_store_model(ts_models, tmp_path, llama_checkpoint):
    raw = ts_models.track(ts.from_pretrained(llama_checkpoint, config(tmp_path)))
    packed = ts_models.track(ts.from_pretrained(llama_checkpoint, config(tmp_path, compression_enabled=True)))
    assert state_of(packed).write_outcome == "published"
    ids = {state_of(raw).model_id, state_of(packed).model_id}
    assert len(ids) == 2
    with ts.open_model(tmp_path / "store", state_of(packed).model_id) as store:
        assert any(store.info(n)["compressed"] for n in store.tensor_names())
    ids_in = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(packed(ids_in).logits, raw(ids_in).logits, "compressed forward")


def test_hub_id_from_the_local_cache(ts_models, tmp_path, llama_checkpoint, monkeypatch):
    # huggingface_hub's cache layout: models--{org}--{name}/refs/main -> a revision; snapshots/{revision}/files.
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(llama_checkpoint):
        (snapshot / name).write_bytes((llama_checkpoint / name).read_bytes())
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    model = ts_models.track(ts.from_pretrained("tiny-org/tiny-llama", config(tmp_path)))
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(model(ids).logits, plain_model(llama_checkpoint)(ids).logits, "hub id")
    with pytest.raises(ts.ConfigError, match="'tiny-org/absent' is neither a local folder nor a hub id") as caught:
        ts.from_pretrained("tiny-org/absent", config(tmp_path))
    assert caught.value.field == "path"


def test_default_storage_path_is_under_the_cache(tmp_path, monkeypatch, ts_models, llama_checkpoint):
    monkeypatch.delenv("TENSORSTREAM_STORAGE_PATH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_storage_path() == str(tmp_path / "cache" / "tensorstream" / "store")
    model = ts_models.track(ts.from_pretrained(llama_checkpoint))  # no Config at all
    assert state_of(model).model_id in ts.Storage(tmp_path / "cache" / "tensorstream" / "store")


# ---- bad input: a typed error naming the file and the tensor, and no partial store ---------------------------------

def copy_checkpoint(source, target):
    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path, llama_checkpoint):
    broken = copy_checkpoint(llama_checkpoint, tmp_path / "wider")
    settings = json.loads((broken / "config.json").read_text())
    settings["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ts.ConfigError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight': the model has shape") \
            as caught:
        ts.from_pretrained(broken, config(tmp_path))
    assert caught.value.field == "checkpoint" and str(broken) in str(caught.value)
    assert not ts.Storage(tmp_path / "store") or len(ts.Storage(tmp_path / "store")) == 0


def test_a_missing_shard_is_named(tmp_path):
    from conftest import build_llama

    build_llama().save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(ts.ConfigError, match=f"{shard}.*missing shard") as caught:
        ts.from_pretrained(tmp_path / "sharded", config(tmp_path))
    assert caught.value.field == "checkpoint"


def test_a_truncated_file_is_named_with_its_tensor_and_no_store_is_left(tmp_path, llama_checkpoint):
    broken = copy_checkpoint(llama_checkpoint, tmp_path / "truncated")
    weights = broken / SINGLE_NAME
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 1000)
    with pytest.raises(ts.ConfigError, match=r"truncated: tensor '[\w.]+' ends at data byte") as caught:
        ts.from_pretrained(broken, config(tmp_path))
    assert str(weights) in str(caught.value)
    store = tmp_path / "store"
    assert len(ts.Storage(store)) == 0 and store_tmp_is_empty(store)


def test_bad_arguments_are_config_errors(tmp_path, llama_checkpoint):
    for kwargs, field in [({"torch_dtype": "float77"}, "torch_dtype"), ({"torch_dtype": torch.int8}, "torch_dtype"),
                          ({"model_class": "LlamaForCausalLM"}, "model_class")]:
        with pytest.raises(ts.ConfigError) as caught:
            ts.from_pretrained(llama_checkpoint, config(tmp_path), **kwargs)
        assert caught.value.field == field
    with pytest.raises(ts.ConfigError, match="does not exist") as caught:
        ts.from_pretrained(tmp_path / "nowhere" / "model", config(tmp_path))
    assert caught.value.field == "path"
    with pytest.raises(ts.ConfigError, match="is a file"):
        ts.from_pretrained(llama_checkpoint / SINGLE_NAME, config(tmp_path))
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((llama_checkpoint / "config.json").read_text())
    with pytest.raises(ts.ConfigError, match="neither model.safetensors.index.json nor model.safetensors"):
        ts.from_pretrained(tmp_path / "no-weights", config(tmp_path))


# ---- memory: about one block, never the model ------------------------------------------------------------------

PRETRAINED_CHILD = """
import json, sys
import torch, transformers, accelerate, tensorstream as ts

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

checkpoint, storage = sys.argv[1], sys.argv[2]
import transformers.models.llama.modeling_llama  # imported before the peak is reset, as from_pretrained would
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS (Linux >= 4.0)
except OSError:
    pass
model = ts.from_pretrained(checkpoint, ts.Config(storage_path=storage, num_io_threads=2, vram_budget_gb=0.06,
                                                 progress=False))
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))  # served from the checkpoint while the store is written
ts.get_model_statistics(model)  # waits for the write and binds the store
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))  # streamed from the store
print(json.dumps({"before": before, "peak": status("VmHWM"),
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_writing_the_store_and_serving_meanwhile_hold_about_one_block_not_the_model(tmp_path):
    import subprocess
    import sys

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=12, vocab_size=512,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "checkpoint"))  # 230 MB, 28 MB layers
    out = subprocess.run([sys.executable, "-c", PRETRAINED_CHILD, str(tmp_path / "checkpoint"),
                          str(tmp_path / "store")], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["before"]
    assert figures["model_bytes"] > 200e6
    assert growth < 0.4 * figures["model_bytes"], f"+{growth / 1e6:.0f} MB for a {figures['model_bytes'] / 1e6:.0f} MB model"

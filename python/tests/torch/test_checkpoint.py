"""Writing the store straight from a Hugging Face checkpoint (tensorstream.torch.checkpoint): a meta model offloaded
with checkpoint= streams bit-identical outputs, single-file and sharded checkpoints, tied and prefixed names, casts,
missing tensors named before anything is written, and a peak RSS of about one block rather than the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import tensorstream as ts  # noqa: E402
from store_faults import state_of  # noqa: E402
from tensorstream.torch.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint  # noqa: E402
from tensorstream.torch.offload import STATE_ATTR  # noqa: E402
from tensorstream.torch.partition import RESIDENT_BLOCK  # noqa: E402


def save(model, path, **kwargs):
    model.save_pretrained(str(path), **kwargs)
    return path


@pytest.mark.parametrize("min_layer_size", [0, 20000])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_meta_model_from_a_checkpoint_matches_the_plain_model(ts_models, tmp_path, name, min_layer_size):
    plain = ts_models.plain(name)
    checkpoint = save(plain, tmp_path / "checkpoint")
    assert (checkpoint / SINGLE_NAME).exists()
    config = ts_models.make_config(tmp_path / "store", min_layer_size=min_layer_size,
                                   vram_budget_gb=0.5 * ts_models.param_bytes(plain) / 1e9)
    model = ts_models.track(ts.offload(ts_models.meta_model(plain), config, model_id=name, checkpoint=checkpoint))
    assert state_of(model).write_outcome == "published"
    ids = ts_models.input_ids()
    with torch.no_grad():
        expected = ts_models.forward(name, plain, ids)
        for _ in range(2):
            ts_models.assert_equal(ts_models.forward(name, model, ids), expected, f"{name} forward")
    ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids), f"{name} generate")
    with ts.open_model(tmp_path / "store", name) as store:
        assert store.metadata["tensorstream.checkpoint"] == str(checkpoint)
        assert (RESIDENT_BLOCK in store.block_names()) == (min_layer_size > 0)
    assert ts.verify_storage_integrity(tmp_path / "store").ok

    # Present now: a second offload writes nothing and does not even open the checkpoint.
    (checkpoint / SINGLE_NAME).rename(checkpoint / "moved.safetensors")
    again = ts_models.track(ts.offload(ts_models.meta_model(plain), config, model_id=name, checkpoint=checkpoint))
    assert state_of(again).write_outcome == "already_existed"
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward(name, again, ids), expected, f"{name} again")


def test_the_store_equals_the_one_offload_of_the_real_model_writes(ts_models, tmp_path):
    """Same blocks, tensors and bytes: the content fingerprint of both stores is the same."""
    plain, real = ts_models.offload("gpt2", tmp_path / "store", min_layer_size=20000)
    from_real = ts.get_model_statistics(real)["model_id"]
    checkpoint = save(plain, tmp_path / "checkpoint")
    model = ts_models.track(ts.offload(ts_models.meta_model(plain),
                                       ts_models.make_config(tmp_path / "store", min_layer_size=20000),
                                       model_id="from-checkpoint", checkpoint=checkpoint))
    with ts.open_model(tmp_path / "store", from_real) as a, ts.open_model(tmp_path / "store", "from-checkpoint") as b:
        assert a.fingerprint == b.fingerprint and from_real == "fp-" + b.fingerprint
        assert a.block_names() == b.block_names()
    model.cleanup_tensorstream()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q), n


def test_sharded_checkpoint_with_an_index(ts_models, tmp_path):
    plain = ts_models.plain("llama")
    checkpoint = save(plain, tmp_path / "checkpoint", max_shard_size="100KB")
    index = json.loads((checkpoint / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = ts_models.track(ts.offload(ts_models.meta_model(plain), ts_models.make_config(tmp_path / "store"),
                                       model_id="llama", checkpoint=checkpoint))
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("llama", model, ids), ts_models.forward("llama", plain, ids))


def test_tied_weights_saved_once_and_a_base_model_checkpoint(ts_models, tmp_path):
    """GPT-2 saves the tied lm_head once (as transformer.wte.weight); a checkpoint of the base GPT2Model has no
    'transformer.' prefix at all. Both load into GPT2LMHeadModel."""
    plain = ts_models.plain("gpt2")
    for what, source in [("full", plain), ("base", plain.transformer)]:
        checkpoint = save(source, tmp_path / what)
        keys = Checkpoint(checkpoint).files
        assert "lm_head.weight" not in keys
        assert ("transformer.wte.weight" in keys) == (what == "full") and ("wte.weight" in keys) == (what == "base")
        model = ts_models.track(ts.offload(ts_models.meta_model(plain), ts_models.make_config(tmp_path / "store"),
                                           model_id=what, checkpoint=checkpoint))
        assert model.lm_head.weight is model.transformer.wte.weight
        ids = ts_models.input_ids()
        with torch.no_grad():
            ts_models.assert_equal(ts_models.forward("gpt2", model, ids), ts_models.forward("gpt2", plain, ids), what)


def test_checkpoint_values_are_cast_to_the_model_dtype(ts_models, tmp_path):
    plain = ts_models.plain("gpt2")
    checkpoint = save(ts_models.plain("gpt2", torch.float16), tmp_path / "fp16")
    model = ts.offload(ts_models.meta_model(plain), ts_models.make_config(tmp_path / "store"), model_id="cast",
                       checkpoint=checkpoint)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.cleanup_tensorstream()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(p, q.half().float()), n


def test_missing_tensor_is_named_and_nothing_is_written(ts_models, tmp_path):
    plain = ts_models.plain("llama")
    tensors = {k: v.contiguous() for k, v in plain.state_dict().items()
               if k not in ("model.layers.2.mlp.up_proj.weight", "model.norm.weight")}
    (tmp_path / "checkpoint").mkdir()
    safetensors_torch.save_file(tensors, str(tmp_path / "checkpoint" / SINGLE_NAME))
    model = ts_models.meta_model(plain)
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path / "store"), model_id="llama",
                   checkpoint=tmp_path / "checkpoint")
    assert caught.value.field == "checkpoint"
    assert "'model.layers.2.mlp.up_proj.weight'" in str(caught.value) and "'model.norm.weight'" in str(caught.value)
    assert all(p.device.type == "meta" for p in model.parameters()) and STATE_ATTR not in model.__dict__
    assert "llama" not in ts.Storage(tmp_path / "store")
    assert not list((tmp_path / "store" / "tmp").iterdir())


def test_checkpoint_of_another_model_is_refused(ts_models, tmp_path):
    checkpoint = save(ts_models.plain("gpt2"), tmp_path / "gpt2")
    llama = ts_models.meta_model(ts_models.plain("llama"))
    with pytest.raises(ts.ConfigError, match="checkpoint .* has no tensor 'model.embed_tokens.weight'"):
        ts.offload(llama, ts_models.make_config(tmp_path / "store"), model_id="llama", checkpoint=checkpoint)
    smaller = ts_models.plain("gpt2").config.to_dict()
    smaller["n_positions"] = 32
    transformers = pytest.importorskip("transformers")
    other = ts_models.meta_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(**smaller)))
    with pytest.raises(ts.ConfigError, match=r"'transformer\.wpe\.weight': the model has shape \[32, 64\], checkpoint "
                                             r".* has \[64, 64\]"):
        ts.offload(other, ts_models.make_config(tmp_path / "store"), model_id="gpt2", checkpoint=checkpoint)


def test_unreadable_checkpoints_are_config_errors(ts_models, tmp_path):
    model = ts_models.meta_model(ts_models.plain("gpt2"))
    config = ts_models.make_config(tmp_path / "store")
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.bin").write_bytes(b"pickle")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SINGLE_NAME).write_bytes(b"\xff" * 16)
    for path, words in [(tmp_path / "absent", "does not exist"), (tmp_path / "empty", INDEX_NAME),
                        (tmp_path / "model.bin", "not a .safetensors file"), (tmp_path / "bad", "not a safetensors")]:
        with pytest.raises(ts.ConfigError, match=words) as caught:
            ts.offload(model, config, model_id="gpt2", checkpoint=path)
        assert caught.value.field == "checkpoint" and str(path) in str(caught.value)


# ---- memory -----------------------------------------------------------------------------------------------------

# Runs in a fresh process: imports, builds the model on meta, then resets the peak RSS (VmHWM) and offloads from
# the checkpoint. Prints the RSS before, the peak during, and the model's size.
CHILD = textwrap.dedent("""
    import json, sys
    import torch, transformers, accelerate, tensorstream as ts

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    checkpoint, storage = sys.argv[1], sys.argv[2]
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(checkpoint))
    before = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS (Linux >= 4.0)
    except OSError:
        pass
    ts.offload(model, ts.Config(storage_path=storage, num_io_threads=2), model_id="big", checkpoint=checkpoint)
    print(json.dumps({"before": before, "peak": status("VmHWM"),
                      "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_offloading_from_a_checkpoint_holds_about_one_block_not_the_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # About 230 MB of fp32 in 8 layers of 28 MB each.
    config = transformers.LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=12, vocab_size=512,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    save(model, tmp_path / "checkpoint")
    del model
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "checkpoint"), str(tmp_path / "store")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["before"]
    print(f"model {figures['model_bytes'] / 1e6:.0f} MB; RSS before offload {figures['before'] / 1e6:.0f} MB, "
          f"peak during offload +{growth / 1e6:.0f} MB")
    assert figures["model_bytes"] > 200e6
    assert growth < 0.4 * figures["model_bytes"]  # one block is 28 MB; the whole model would be 230 MB
    with ts.open_model(tmp_path / "store", "big") as store:
        # embed_tokens, 8 layers, lm_head; model.norm (3 KB) stays resident
        assert len(store.block_names()) == 1 + 8 + 1 + 1 and store.block_names()[-1] == RESIDENT_BLOCK

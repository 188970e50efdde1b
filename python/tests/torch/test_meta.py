"""Offloading a model built on the meta device (tensorstream.torch.meta) onto a store an earlier offload of the real
model wrote: bit-identical outputs, the resident values from the store, and every refusal (wrong model, absent id,
no model_id, unrecoverable buffers, mixed devices)."""

from __future__ import annotations

import errno

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensorstream as ts  # noqa: E402
from tensorstream.torch.offload import STATE_ATTR  # noqa: E402
from tensorstream.torch.partition import RESIDENT_BLOCK, partition_model  # noqa: E402

# 0: every block with bytes streams. 20000: Llama's / GPT-2's layers and embeddings stream, the final norm (and
# GPT-2's position embedding) stay resident and come back from the store's "(resident)" block.
MIN_LAYER_SIZES = [0, 20000]


def on_meta(model):
    return all(p.device.type == "meta" for p in model.parameters())


def untouched(model):
    """The model is exactly as before a failed offload: on meta, no hooks, no TensorStream state."""
    return on_meta(model) and STATE_ATTR not in model.__dict__ and \
        all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("min_layer_size", MIN_LAYER_SIZES)
@pytest.mark.parametrize("name, how", [("llama", "init_empty_weights"), ("gpt2", "init_empty_weights"),
                                       ("gpt2", "meta_device")])
def test_meta_model_on_a_store_written_by_offload_matches_the_plain_model(ts_models, tmp_path, name, how,
                                                                          min_layer_size):
    plain, _real = ts_models.offload(name, tmp_path, budget=0.5, model_id="stored", min_layer_size=min_layer_size)
    model = ts_models.meta_model(plain, how)
    assert on_meta(model)
    config = ts_models.make_config(tmp_path, min_layer_size=min_layer_size,
                                   vram_budget_gb=0.5 * ts_models.param_bytes(plain) / 1e9)
    assert ts_models.track(ts.offload(model, config, model_id="stored")) is model
    state = model.__dict__[STATE_ATTR]
    assert state.model_id == "stored" and state.write_outcome == "already_existed"
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids = ts_models.input_ids()
    with torch.no_grad():
        expected = ts_models.forward(name, plain, ids)
        for _ in range(2):
            ts_models.assert_equal(ts_models.forward(name, model, ids), expected, f"{name} ({how}) forward")
    ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids), f"{name} generate")
    stats = ts.get_model_statistics(model)
    assert stats["checksum_failures"] == 0 and RESIDENT_BLOCK not in stats["blocks"]
    if min_layer_size:
        assert stats["resident_blocks"] >= 1 and stats["resident_bytes"] > 0
        resident = [n for b in state.partition.resident for n in (e.name for e in b.params)]
        plain_params = dict(plain.named_parameters())
        for n in resident:  # real values from the store, not placeholders
            assert torch.equal(dict(model.named_parameters())[n], plain_params[n]), n


def test_from_config_under_init_empty_weights(ts_models, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    plain, _real = ts_models.offload("llama", tmp_path, model_id="llama")
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(plain.config).eval()
    ts_models.track(ts.offload(model, ts_models.make_config(tmp_path), model_id="llama"))
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("llama", model, ids), ts_models.forward("llama", plain, ids))


def test_content_id_of_an_earlier_offload_works_as_model_id(ts_models, tmp_path):
    plain, real = ts_models.offload("gpt2", tmp_path)
    stored_id = ts.get_model_statistics(real)["model_id"]
    assert stored_id.startswith("fp-")
    model = ts_models.track(ts.offload(ts_models.meta_model(plain), ts_models.make_config(tmp_path),
                                       model_id=stored_id))
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("gpt2", model, ids), ts_models.forward("gpt2", plain, ids))


def test_cleanup_restores_the_original_weights_and_keeps_ties(ts_models, tmp_path):
    plain, _real = ts_models.offload("gpt2", tmp_path, model_id="gpt2", min_layer_size=20000)
    model = ts_models.meta_model(plain)
    ts.offload(model, ts_models.make_config(tmp_path, min_layer_size=20000), model_id="gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight  # init_empty_weights untied them; offload re-tied
    model.cleanup_tensorstream()
    assert STATE_ATTR not in model.__dict__
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    restored, original = dict(model.named_parameters()), dict(plain.named_parameters())
    assert restored.keys() == original.keys()
    for name, p in restored.items():
        assert p.device.type == "cpu" and p.is_contiguous(), name
        assert torch.equal(p, original[name]), name
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("gpt2", model, ids), ts_models.forward("gpt2", plain, ids))


class WithBuffers(nn.Module):
    """A model whose output depends on persistent buffers (a meta build puts them on meta too)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(3)])
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 32))
        self.register_buffer("shift", torch.zeros(32), persistent=True)
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x) * self.scale + self.shift)
        return x * self.steps


def test_persistent_buffers_come_back_from_the_store(tmp_path):
    torch.manual_seed(0)
    plain = WithBuffers().eval()
    plain.shift.uniform_(-1, 1)  # not what the constructor computes: only the store knows it
    real = WithBuffers().eval()
    real.load_state_dict(plain.state_dict())
    config = ts.Config(storage_path=str(tmp_path), min_layer_size=0, num_io_threads=2)
    ts.offload(real, config, model_id="buffers")
    with ts.open_model(tmp_path, "buffers") as store:
        assert store.block_names() == ["layers.0", "layers.1", "layers.2", RESIDENT_BLOCK]
        assert store.block_tensor_names(RESIDENT_BLOCK) == ["scale", "shift", "steps"]
    real.cleanup_tensorstream()
    with torch.device("meta"):
        model = WithBuffers().eval()
    ts.offload(model, config, model_id="buffers")
    assert torch.equal(model.shift, plain.shift) and torch.equal(model.steps, plain.steps)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    model.cleanup_tensorstream()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_a_meta_model_that_streams_nothing_gets_every_value_from_the_store(ts_models, tmp_path):
    plain, _real = ts_models.offload("gpt2", tmp_path, model_id="small", min_layer_size=1 << 40)
    with ts.open_model(tmp_path, "small") as store:
        assert store.block_names() == [RESIDENT_BLOCK]
    model = ts_models.track(ts.offload(ts_models.meta_model(plain),
                                       ts_models.make_config(tmp_path, min_layer_size=1 << 40), model_id="small"))
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("gpt2", model, ids), ts_models.forward("gpt2", plain, ids))


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_wrong_model_names_the_tensor_and_what_differs(ts_models, tmp_path):
    transformers = pytest.importorskip("transformers")
    plain, _real = ts_models.offload("llama", tmp_path, model_id="llama")
    other_config = plain.config.to_dict()
    other_config["intermediate_size"] = 96
    other = ts_models.meta_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**other_config)))
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(other, ts_models.make_config(tmp_path), model_id="llama")
    message = str(caught.value)
    assert caught.value.field == "model"
    assert "'model.layers.0.mlp.gate_proj.weight'" in message and "[96, 64]" in message and "[128, 64]" in message
    assert "llama" in message and str(tmp_path) in message
    assert untouched(other)


def test_other_dtype_other_layers_and_other_blocks_are_named(ts_models, tmp_path):
    plain, _real = ts_models.offload("llama", tmp_path, model_id="llama")
    half = ts_models.meta_model(plain).to(torch.bfloat16)
    with pytest.raises(ts.ConfigError, match=r"'model\.embed_tokens\.weight' has dtype bfloat16 in the model but "
                                             r"float32 in the store"):
        ts.offload(half, ts_models.make_config(tmp_path), model_id="llama")
    assert untouched(half)
    fewer = ts_models.meta_model(ts_models.cache.plain("llama"))
    del fewer.model.layers[11]
    with pytest.raises(ts.ConfigError, match=r"holds tensor 'model\.layers\.11\.[a-z_.]+' \(block 'model\.layers\.11'\)"
                                             r", which the model does not have"):
        ts.offload(fewer, ts_models.make_config(tmp_path), model_id="llama")
    grouped = ts_models.meta_model(plain)
    with pytest.raises(ts.ConfigError, match=r"tensor 'model\.norm\.weight' is in block '\(resident\)' of the model "
                                             r"but in block 'model\.norm' of the store"):
        ts.offload(grouped, ts_models.make_config(tmp_path, min_layer_size=20000), model_id="llama")
    assert untouched(grouped)


def test_absent_model_id_is_a_typed_error_naming_path_and_id(ts_models, tmp_path):
    plain, _real = ts_models.offload("gpt2", tmp_path, model_id="gpt2")
    for storage in (tmp_path, tmp_path / "no-store-here"):
        model = ts_models.meta_model(plain)
        with pytest.raises(ts.errors.StoreNotFoundError) as caught:
            ts.offload(model, ts_models.make_config(storage), model_id="gpt2-xl")
        assert isinstance(caught.value, FileNotFoundError) and caught.value.errno == errno.ENOENT
        assert "'gpt2-xl'" in str(caught.value) and str(storage) in str(caught.value)
        assert "checkpoint=" in str(caught.value)
        assert untouched(model)
    assert not (tmp_path / "no-store-here").exists()


def test_meta_model_without_model_id_is_refused(ts_models, tmp_path):
    model = ts_models.meta_model(ts_models.plain("gpt2"))
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path))
    assert caught.value.field == "model_id"
    assert "meta" in str(caught.value) and "cannot be computed without the weights" in str(caught.value)
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path), model_id="../escape")
    assert caught.value.field == "model_id"
    assert untouched(model) and not (tmp_path / "models").exists()


def test_non_persistent_buffer_on_meta_is_refused(ts_models, tmp_path):
    plain, _real = ts_models.offload("llama", tmp_path, model_id="llama")
    model = ts_models.meta_model(plain, "meta_device")  # rotary inv_freq (non-persistent) is on meta too
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path), model_id="llama")
    message = str(caught.value)
    assert caught.value.field == "model"
    assert "'model.rotary_emb.inv_freq'" in message and "init_empty_weights()" in message
    assert untouched(model)


def test_mixed_meta_and_real_parameters_are_refused(ts_models, tmp_path):
    model = ts_models.meta_model(ts_models.plain("gpt2"))
    model.transformer.ln_f.weight = nn.Parameter(torch.ones(64))
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path), model_id="gpt2")
    assert caught.value.field == "model" and "transformer.ln_f.weight" in str(caught.value)
    assert STATE_ATTR not in model.__dict__


def test_checkpoint_with_a_real_model_is_refused(ts_models, tmp_path):
    model = ts_models.copy("gpt2")
    with pytest.raises(ts.ConfigError) as caught:
        ts.offload(model, ts_models.make_config(tmp_path), model_id="gpt2", checkpoint=tmp_path)
    assert caught.value.field == "checkpoint"
    assert STATE_ATTR not in model.__dict__ and not (tmp_path / "models").exists()


def test_store_without_a_resident_block_is_explained(ts_models, tmp_path):
    """A store an older TensorStream wrote holds the streamed blocks only: a meta model that keeps tensors resident
    cannot get their values from it."""
    plain = ts_models.plain("gpt2")
    model = ts_models.meta_model(plain)
    probe = partition_model(plain, 20000)
    ts.write_model(tmp_path, {b.name: {e.name: e.param.detach() for e in b.params} for b in probe.streamed},
                   model_id="old")
    with pytest.raises(ts.ConfigError,
                       match=r"has no '\(resident\)' block, .* older TensorStream wrote it.*remove\('old'\)"):
        ts.offload(model, ts_models.make_config(tmp_path, min_layer_size=20000), model_id="old")
    assert untouched(model)


def test_a_failed_commit_puts_the_meta_parameters_back(ts_models, tmp_path, monkeypatch):
    plain, _real = ts_models.offload("gpt2", tmp_path, model_id="gpt2")
    model = ts_models.meta_model(plain)
    from tensorstream.torch import hooks

    def broken(self):
        raise RuntimeError("injected")

    monkeypatch.setattr(hooks.StreamingRuntime, "install", broken)
    with pytest.raises(RuntimeError, match="injected"):
        ts.offload(model, ts_models.make_config(tmp_path), model_id="gpt2")
    assert untouched(model)

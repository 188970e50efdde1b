"""Hooks, bindings, placeholders and eviction (tensorstream.torch.hooks) on small custom modules and one HF model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensorstream as ts  # noqa: E402
from tensorstream.torch.hooks import placeholder  # noqa: E402
from tensorstream.torch.offload import STATE_ATTR  # noqa: E402


def runtime_of(model):
    return model.__dict__[STATE_ATTR].runtime


def is_placeholder(t):
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def offload_copy(ts_models, tmp_path, plain, budget=None, **config):
    import copy

    model = copy.deepcopy(plain)
    if budget is not None:
        config["vram_budget_gb"] = budget * ts_models.param_bytes(plain) / 1e9
    return ts_models.track(ts.offload(model, ts_models.make_config(tmp_path, **config)))


class OutOfOrder(nn.Module):
    """Registers a, b, c but runs c, then a, then b (blocks are not visited in registration order)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.tanh(self.c(x)))))


class Nested(nn.Module):
    """A module with a parameter of its own that calls children streaming as blocks of their own: its block stays
    pinned while theirs load."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(32))
        self.inner = nn.Linear(32, 32)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])

    def forward(self, x):
        x = self.inner(x) * self.gain
        for layer in self.layers:
            x = torch.relu(layer(x)) + self.gain
        return x


class Faulty(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x, fail_at=None):
        for i, layer in enumerate(self.layers):
            if i == fail_at:
                raise ValueError("boom")
            x = layer(x)
        return x


def seeded(cls, *args):
    torch.manual_seed(11)
    return cls(*args).eval()


def test_placeholders_take_no_memory_and_keep_the_module_api(ts_models, tmp_path):
    plain = ts_models.plain("llama")
    model = offload_copy(ts_models, tmp_path, plain, budget=0.1)
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert p.dtype == q.dtype and p.shape == q.shape and p.device.type == "cpu", name
        assert is_placeholder(p) or p.numel() <= 1, name
        assert torch.isnan(p.reshape(-1)[0]), name
    assert list(model.state_dict()) == list(plain.state_dict())
    assert model.to("cpu") is model and model.dtype == torch.float32
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("llama", model, ids), ts_models.forward("llama", plain, ids))
    ph = placeholder(torch.bfloat16, (3, 5))
    assert ph.shape == (3, 5) and ph.dtype == torch.bfloat16 and ph.untyped_storage().nbytes() == 2
    with pytest.raises(RuntimeError):
        ph.add_(1)  # several elements share one location: in-place writes are refused
    assert placeholder(torch.int64, (4,)).sum() == 0


def test_parameters_are_bound_while_their_module_runs(ts_models, tmp_path):
    plain = ts_models.plain("llama")
    model = ts_models.copy("llama")
    seen = []

    def check(module, args):  # registered before offload: TensorStream's pre-hook still runs first
        seen.append(torch.equal(module.weight, plain.model.layers[5].mlp.down_proj.weight))

    model.model.layers[5].mlp.down_proj.register_forward_pre_hook(check)
    ts_models.track(ts.offload(model, ts_models.make_config(tmp_path, vram_budget_gb=2e-4)))
    expected_q = plain.model.layers[6].self_attn.q_proj.weight
    model.model.layers[6].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: seen.append(torch.equal(module.weight, expected_q)))
    with torch.no_grad():
        ts_models.forward("llama", model, ts_models.input_ids())
    assert seen == [True, True]


def test_eviction_puts_placeholders_back(ts_models, tmp_path):
    plain = ts_models.plain("llama")
    model = offload_copy(ts_models, tmp_path, plain, budget=0.1, prefetch_strategy="none")
    with torch.no_grad():
        ts_models.forward("llama", model, ts_models.input_ids())
    runtime = runtime_of(model)
    evicted = [sb for sb in runtime.blocks if sb.bound_address is None]
    bound = [sb for sb in runtime.blocks if sb.bound_address is not None]
    assert evicted and bound and ts.get_model_statistics(model)["evictions"] >= len(evicted)
    assert all(is_placeholder(p) for sb in evicted for p, *_ in sb.tensors if p.numel() > 1)
    assert all(not is_placeholder(p) for sb in bound for p, *_ in sb.tensors)
    assert runtime.pinned_blocks() == 0


def test_eviction_callback_never_unbinds_a_pinned_block(ts_models, tmp_path):
    """A late eviction callback (racing with a fresh acquire of the same block) must not clobber live views."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).eval()
    model = offload_copy(ts_models, tmp_path, plain, vram_budget_gb=1e-3)  # room for both: no real eviction
    runtime = runtime_of(model)

    def spurious_eviction(module, args):
        for sb in runtime.blocks:
            runtime.on_evicted(sb.index)

    model[0].register_forward_pre_hook(spurious_eviction)  # runs after TensorStream bound block "0"
    x = torch.randn(3, 16)
    with torch.no_grad():
        ts_models.assert_equal(model(x), plain(x))
    assert runtime.blocks[0].bound_address is not None  # pinned at the time: kept
    assert runtime.blocks[1].bound_address is not None  # re-bound when it ran


@pytest.mark.parametrize("budget", [0.01, 1.0])
def test_plain_sequential_and_out_of_order_modules(ts_models, tmp_path, budget):
    sequential = seeded(nn.Sequential, nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.LayerNorm(16))
    out_of_order = seeded(OutOfOrder)
    x = torch.randn(4, 16)
    for i, plain in enumerate([sequential, out_of_order]):
        model = offload_copy(ts_models, tmp_path / str(i), plain, budget=budget, backend="pread")
        with torch.no_grad():
            for _ in range(3):
                ts_models.assert_equal(model(x), plain(x), type(plain).__name__)
        stats = ts.get_model_statistics(model)
        assert stats["acquires"] == 3 * stats["streamed_blocks"]  # one acquire per block use, none per submodule
    assert list(ts.get_model_statistics(model)["blocks"]) == ["a", "b", "c"]


def test_nested_blocks_fit_the_raised_budget(ts_models, tmp_path):
    plain = seeded(Nested)
    model = offload_copy(ts_models, tmp_path, plain, budget=0.01)
    stats = ts.get_model_statistics(model)
    blocks = stats["blocks"]
    assert stats["budget_bytes"] >= blocks["(root)"]["slot_bytes"] + blocks["layers.0"]["slot_bytes"]
    x = torch.randn(2, 32)
    with torch.no_grad():
        for _ in range(2):
            ts_models.assert_equal(model(x), plain(x))


def test_exception_inside_forward_releases_the_blocks(ts_models, tmp_path):
    plain = seeded(Faulty)
    model = offload_copy(ts_models, tmp_path, plain, budget=0.01)
    x = torch.randn(2, 8)
    for _ in range(3):
        with pytest.raises(ValueError, match="boom"):
            model(x, fail_at=2)
        assert runtime_of(model).pinned_blocks() == 0
    with torch.no_grad():  # had a pin leaked, the minimum budget would leave no room for the next block
        ts_models.assert_equal(model(x), plain(x))


def test_converting_an_offloaded_model_is_refused_at_the_next_forward(ts_models, tmp_path):
    plain = seeded(nn.Sequential, nn.Linear(8, 8), nn.Linear(8, 8))
    model = offload_copy(ts_models, tmp_path, plain)
    with pytest.raises(ts.ConfigError) as caught:  # model.to(dtype) is refused at once
        model.to(torch.float64)
    assert caught.value.field == "dtype"
    model.double()  # nn.Module's own conversion: caught at the next forward
    with pytest.raises(ts.ConfigError) as caught:
        model(torch.randn(2, 8, dtype=torch.float64))
    assert caught.value.field == "model" and "cleanup_tensorstream" in str(caught.value)
    assert runtime_of(model).pinned_blocks() == 0


def test_hooks_are_kept_and_removed(ts_models, tmp_path):
    plain = ts_models.plain("gpt2")
    model = offload_copy(ts_models, tmp_path, plain)
    runtime = runtime_of(model)
    hooked = sum(len(sb.block.modules) for sb in runtime.blocks)
    assert len(runtime.handles) == 2 * hooked
    assert len(model.transformer.h[0]._forward_pre_hooks) == 1 and len(model.lm_head._forward_hooks) == 1
    model.cleanup_tensorstream()
    assert not runtime.handles and all(not m._forward_pre_hooks for m in model.modules())

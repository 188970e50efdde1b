"""Partitioning modules into blocks (tensorstream.torch.partition) and sizing the budget (arena.plan_budget).
No engine here: pure bookkeeping."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tensorstream.torch.arena import ALIGNMENT, Arena, plan_budget  # noqa: E402
from tensorstream.torch.partition import (ROOT_NAME, qualified_names, partition_model,  # noqa: E402
                                          resident_tensors)


def names(partition, streamed=None):
    return [b.name for b in partition.blocks if streamed is None or b.streamed == streamed]


class Small(nn.Module):
    """Leaf-level modules of various sizes registered in a known order (fp32: 4 bytes per element)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)           # 80 bytes
        self.b = nn.LayerNorm(4)           # 32 bytes
        self.big = nn.Linear(32, 32)       # 4224 bytes
        self.c = nn.Linear(4, 4)           # 80 bytes
        self.d = nn.LayerNorm(4)           # 32 bytes


def test_sequential_children_are_blocks():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 2), nn.Tanh()))
    partition = partition_model(model, min_layer_size=0)
    assert names(partition) == ["0", "2", "3"]  # the ReLU has no parameters
    assert all(b.kind == "layer" and b.streamed for b in partition.blocks)
    assert [e.name for e in partition.blocks[2].params] == ["3.0.weight", "3.0.bias"]  # nested lists stay inside


def test_min_layer_size_groups_small_modules_and_keeps_the_rest_resident():
    model = Small()
    assert names(partition_model(model, 0)) == ["a", "b", "big", "c", "d"]
    grouped = partition_model(model, 100)
    # a+b reach 100 bytes, big streams alone, c+d (112) reach it too.
    assert [(b.name, b.streamed, [e.name for e in b.params]) for b in grouped.blocks] == [
        ("a", True, ["a.weight", "a.bias", "b.weight", "b.bias"]),
        ("big", True, ["big.weight", "big.bias"]),
        ("c", True, ["c.weight", "c.bias", "d.weight", "d.bias"]),
    ]
    large = partition_model(model, 1000)
    assert [(b.name, b.streamed) for b in large.blocks] == [("big", True), ("a", False)]  # a+b+c+d: 224 < 1000
    assert large.resident_bytes == 224 and large.streamed_bytes == 4224
    assert partition_model(model, 1 << 30).streamed == []


def test_small_layers_below_min_layer_size_stay_resident():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(64, 64))
    partition = partition_model(model, 1000)
    assert [(b.name, b.streamed) for b in partition.blocks] == [("0", False), ("1", True)]


def test_shared_parameters_merge_blocks_across_lists_and_modules():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight
            self.layers[2].weight = self.layers[0].weight  # weights shared between two layers

    model = Tied()
    partition = partition_model(model, 0)
    assert names(partition) == ["embed", "layers.0", "layers.1"]
    embed, first, _ = partition.blocks
    assert [e.name for e in embed.params] == ["embed.weight"] and model.head in embed.modules
    assert {e.name for e in first.params} == {"layers.0.weight", "layers.0.bias", "layers.2.bias"}
    assert model.layers[2] in first.modules and model.layers[0] in first.modules
    owners = {}
    for block in partition.blocks:
        for e in block.params:
            assert id(e.param) not in owners  # every parameter in exactly one block
            owners[id(e.param)] = block.name
    assert len(owners) == len(list(model.parameters()))


def test_shared_module_objects_and_root_parameters():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.shared = nn.Linear(3, 3)
            self.alias = self.shared          # the same module under two names

    partition = partition_model(Root(), 0)
    assert names(partition) == [ROOT_NAME, "shared"]
    assert partition.blocks[1].module_names == ["shared"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_sized_parameters_are_resident():
    model = nn.Sequential(nn.Linear(0, 4, bias=False), nn.Linear(4, 4))
    partition = partition_model(model, 0)
    assert [(b.name, b.streamed) for b in partition.blocks] == [("0", False), ("1", True)]


def test_resident_tensors_are_resident_parameters_then_persistent_buffers():
    class Buffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.LayerNorm(4)                       # 32 bytes: resident at min_layer_size=1000
            self.big = nn.Linear(32, 32)                      # streamed
            self.tied = nn.Linear(4, 4)                       # resident
            self.alias = self.tied                            # the same module (and parameters) twice
            self.register_buffer("table", torch.arange(6))
            self.register_buffer("cache", torch.ones(2), persistent=False)  # computed, never stored
            self.inner = nn.Module()
            self.inner.register_buffer("shared", self.table)  # the same tensor under a second name

    model = Buffers()
    partition = partition_model(model, 1000)
    resident = resident_tensors(model, partition)
    assert [(r.name, r.kind) for r in resident] == [
        ("small.weight", "parameter"), ("small.bias", "parameter"), ("tied.weight", "parameter"),
        ("tied.bias", "parameter"), ("table", "buffer")]
    assert resident[-1].tensor is model.table and resident[0].tensor is model.small.weight
    names = qualified_names(model)
    assert names[id(model.tied.weight)] == ["tied.weight", "alias.weight"]
    assert names[id(model.table)] == ["table", "inner.shared"] and names[id(model.cache)] == ["cache"]
    assert [r.name for r in resident_tensors(model, partition_model(model, 0))] == ["table"]


def test_names_are_deterministic_for_hugging_face_models(ts_models):
    first = partition_model(ts_models.build_t5(), 0)
    second = partition_model(ts_models.build_t5(), 0)
    assert names(first) == names(second) == ["shared", "encoder.block.0", "encoder.block.1",
                                              "encoder.final_layer_norm", "decoder.block.0", "decoder.block.1",
                                              "decoder.final_layer_norm"]
    shared = first.blocks[0]
    assert shared.module_names == ["shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]
    assert [e.name for e in shared.params] == ["shared.weight"]


def test_pinned_chains_follow_nesting(ts_models):
    model = ts_models.build_bert()
    partition = partition_model(model, 0)
    index = {b.name: b.index for b in partition.blocks}
    chains = partition.pinned_chains(model)
    head = index["bert.embeddings.word_embeddings"]  # merged with cls.predictions (tied bias and decoder)
    assert frozenset({head, index["cls.predictions.transform.dense"]}) in chains
    assert max(len(c) for c in chains) == 2
    llama = ts_models.build_llama(layers=2)
    assert max(len(c) for c in partition_model(llama, 0).pinned_chains(llama)) == 1


def test_plan_budget():
    slots = [8192, 4096 * 5, 4096]
    plan = plan_budget(None, slots, [[0], [1], [2]])
    assert plan.default_bytes == 32768 // 4 and plan.minimum_bytes == 20480
    assert plan.raised and plan.budget_bytes == 20480 and plan.arena_bytes == 20480
    roomy = plan_budget(30000, slots, [[0], [1]])
    assert not roomy.raised and not roomy.capped and roomy.budget_bytes == 30000 and roomy.arena_bytes == 32768
    capped = plan_budget(1 << 20, slots, [[0], [1]])  # more than the whole model: all of it, no more
    assert capped.capped and capped.budget_bytes == capped.arena_bytes == 32768
    nested = plan_budget(None, slots, [[0, 1], [2]])
    assert nested.minimum_bytes == 8192 + 20480 and nested.budget_bytes == 28672
    assert nested.arena_bytes == 28672 + 20480  # one more largest slot: a contiguous slot always exists
    assert plan_budget(1000, [100], [[0]]).budget_bytes == 4096  # slots are whole pages
    assert roomy.slack_bytes == 0  # device arenas: the arena is what is allocated


def test_plan_budget_gives_host_arenas_of_unequal_blocks_two_largest_blocks_of_placement_slack():
    slots = [8192, 4096 * 5, 4096]
    host = plan_budget(16384, slots, [[0], [1], [2]], placement_slack=True)
    assert host.budget_bytes == 20480 and host.slack_bytes == 40960 and host.arena_bytes == 61440
    equal = plan_budget(8192, [4096] * 4, [[0], [1], [2], [3]], placement_slack=True)
    assert equal.slack_bytes == 0 and equal.arena_bytes == 8192  # equal blocks: every hole fits every block
    everything = plan_budget(1 << 20, slots, [[0], [1]], placement_slack=True)
    assert everything.slack_bytes == 0 and everything.arena_bytes == 32768  # all fit: nothing is ever evicted


def test_arena_is_aligned():
    arena = Arena(3 * ALIGNMENT)
    assert arena.address % ALIGNMENT == 0 and arena.tensor.numel() == 3 * ALIGNMENT
    view = arena.bytes_at(arena.address + ALIGNMENT, 16)
    assert view.data_ptr() == arena.address + ALIGNMENT and arena.contains(arena.address, 3 * ALIGNMENT)
    assert not arena.contains(arena.address + 1, 3 * ALIGNMENT)

"""Embeddings read by rows (tensorstream/torch/rows.py): an untied nn.Embedding block is not streamed whole; each
forward reads the rows of its ids. Bit-identical outputs (real and meta models, several budgets), bytes read per
decoded token, the tied GPT-2 embedding keeping the streamed path, corruption, cleanup, threads, tracing."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tensorstream as ts  # noqa: E402
from store_faults import state_of, flip_bit, chunk_offsets  # noqa: E402
from tensorstream.torch import offload as offload_module  # noqa: E402
from tensorstream.torch.partition import partition_model  # noqa: E402
from tensorstream.torch.rows import qualifies_for_rows, row_chunk_size  # noqa: E402

EMBED = "model.embed_tokens"
EMBED_WEIGHT = "model.embed_tokens.weight"


def engine_block_names(model):
    return [sb.name for sb in state_of(model).runtime.blocks]


# ---- outputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("path", ["real", "meta"])
def test_untied_llama_reads_its_embedding_by_rows_and_matches_the_plain_model(ts_models, tmp_path, budget, path,
                                                                             caplog):
    caplog.set_level(logging.INFO, logger="tensorstream")
    plain = ts_models.plain("llama")
    vram = budget * ts_models.param_bytes(plain) / 1e9
    if path == "real":
        _plain, model = ts_models.offload("llama", tmp_path, budget=budget, compression_enabled=budget == 0.5)
    else:
        writer = ts_models.copy("llama")
        ts.offload(writer, ts_models.make_config(tmp_path), model_id="llama")
        writer.cleanup_tensorstream()
        model = ts_models.track(ts.offload(ts_models.meta_model(plain), ts_models.make_config(
            tmp_path, vram_budget_gb=vram), model_id="llama"))
    assert any("read by rows" in r.getMessage() and EMBED in r.getMessage() for r in caplog.records)
    assert EMBED not in engine_block_names(model) and "lm_head" in engine_block_names(model)
    assert "forward" in model.model.embed_tokens.__dict__
    assert model.model.embed_tokens.weight.stride() == (0, 0)  # the placeholder: no memory
    ts_models.assert_matches_plain("llama", plain, model, ts_models.input_ids())

    stats = ts.get_model_statistics(model)
    assert stats["row_read_blocks"] == [EMBED]
    embed = stats["blocks"][EMBED]
    assert embed["read_by_rows"] and embed["slot_bytes"] == 0 and embed["evictions"] == 0
    assert stats["row_reads"] == embed["row_reads"] == 3 + 6  # three forwards, then prefill + 5 decode steps
    assert stats["row_bytes_read"] == embed["bytes_read"] > 0
    assert sum(b["bytes_read"] for b in stats["blocks"].values()) == stats["bytes_read"]
    assert stats["held_bytes"] <= stats["budget_bytes"] and stats["checksum_failures"] == 0


def test_budget_and_arena_leave_the_embedding_out(ts_models, tmp_path):
    _plain, model = ts_models.offload("llama", tmp_path)  # default budget: a quarter of what the engine streams
    stats = ts.get_model_statistics(model)
    engine_slots = sum(b["slot_bytes"] for name, b in stats["blocks"].items() if name != EMBED)
    assert stats["blocks"][EMBED]["slot_bytes"] == 0
    assert engine_slots // 4 <= stats["budget_bytes"] <= engine_slots // 4 + 4096
    with ts.open_model(tmp_path, stats["model_id"]) as store:  # still stored as a block of its own
        assert store.block_tensor_names(EMBED) == [EMBED_WEIGHT]
    _plain, whole = ts_models.offload("llama", tmp_path, budget=2.0)
    assert ts.get_model_statistics(whole)["budget_bytes"] == engine_slots  # capped at the engine's blocks


def build_big_vocab_llama(vocab=32768):
    """Two layers and an 8 MiB embedding: two 4 MiB store chunks, larger than all layers together."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(11)
    return transformers.LlamaForCausalLM(cfg).eval()


# The KV cache argument and output field are "cache" in recent transformers, "past_key_values" before.
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def bytes_per_decoded_token(model, steps=4):
    """Bytes read per decode step (one new token with a KV cache), after the prefill."""
    ids = torch.tensor([[5, 9, 300, 7000]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        ts.get_model_statistics(model, reset=True)
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{CACHE: getattr(out, CACHE)})
            token = out.logits[:, -1:].argmax(-1)
    return ts.get_model_statistics(model)["bytes_read"] / steps, ts.get_model_statistics(model)


@pytest.mark.parametrize("verify", [False, True], ids=["unverified", "verified"])
def test_bytes_read_per_decoded_token_drop_by_about_the_embedding(ts_models, tmp_path, monkeypatch, verify):
    plain = build_big_vocab_llama()
    embed_bytes = plain.model.embed_tokens.weight.numel() * 4
    row_bytes = embed_bytes // plain.config.vocab_size
    config = dict(vram_budget_gb=0.1 * ts_models.param_bytes(plain) / 1e9, verify_checksums=verify,
                  backend="pread")

    with monkeypatch.context() as patch:  # before: the embedding is a streamed block like any other
        patch.setattr(offload_module, "row_read_blocks", lambda model, partition: [])
        before_model = ts_models.track(ts.offload(copy.deepcopy(plain),
                                                  ts_models.make_config(tmp_path / "before", **config)))
        assert EMBED in engine_block_names(before_model)
        before, before_stats = bytes_per_decoded_token(before_model)
        before_model.cleanup_tensorstream()
    assert before_stats["blocks"][EMBED]["bytes_read"] >= embed_bytes  # read whole for every token

    model = ts_models.track(ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path, **config)))
    after, stats = bytes_per_decoded_token(model)
    embed = stats["blocks"][EMBED]
    assert embed["row_reads"] == 4 and embed["rows_read"] == 4
    table_chunk = row_chunk_size(row_bytes, 4 << 20)
    assert table_chunk == 64 << 10  # 256 rows of 256 bytes
    with ts.open_model(tmp_path, state_of(model).model_id) as store:
        assert store.info(EMBED_WEIGHT)["chunk_size"] == table_chunk  # written with the table's own chunks
    if verify:  # a verified row costs its table's 64 KiB chunk (checksums cover chunks), not a 4 MiB one
        assert embed["bytes_read"] <= 4 * table_chunk
        assert before - after >= (embed_bytes - table_chunk) * 0.95
    else:  # unverified raw rows are read alone
        assert embed["bytes_read"] == 4 * row_bytes
        assert before - after >= (embed_bytes - row_bytes) * 0.95
    print(f"bytes read per decoded token: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")

    ids = torch.tensor([[5, 9, 300, 7000, 32767, 0]])
    ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids), "greedy generate")


# ---- which embeddings qualify -----------------------------------------------------------------------------------


def test_tied_gpt2_embedding_keeps_the_streamed_path(ts_models, tmp_path):
    plain, model = ts_models.offload("gpt2", tmp_path, budget=0.5)
    stats = ts.get_model_statistics(model)
    assert "transformer.wte" in engine_block_names(model)  # tied to lm_head: streamed whole
    assert "forward" not in model.transformer.wte.__dict__
    assert stats["row_read_blocks"] == ["transformer.wpe"]  # the untied position embedding is read by rows
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("gpt2", model, ids), ts_models.forward("gpt2", plain, ids))
    ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids))


class ScaledEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


class Embeddings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = torch.nn.Embedding(50, 8, padding_idx=3)
        self.max_norm = torch.nn.Embedding(50, 8, max_norm=1.0)
        self.scaled = ScaledEmbedding(50, 8)
        self.shared_a = torch.nn.Embedding(50, 8)
        self.shared_b = torch.nn.Embedding(50, 8)
        self.shared_b.weight = self.shared_a.weight
        self.patched = torch.nn.Embedding(50, 8)
        self.patched.forward = self.patched.forward  # an instance forward set by someone else (accelerate hooks)
        self.linear = torch.nn.Linear(8, 8)


@pytest.mark.parametrize("row_bytes, chunk", [
    (256, 64 << 10), (1536, 61440), (768, 61440), (4096, 64 << 10), (8192, 64 << 10), (16384, 64 << 10),
    (65536, 64 << 10), (98304, 98304), (1000, 64 << 10), (100000, 102400)])
def test_row_chunk_size_holds_whole_rows_when_it_can(row_bytes, chunk):
    size = row_chunk_size(row_bytes, 4 << 20)
    assert size == chunk and size % 4096 == 0 and size >= row_bytes
    if row_bytes in (256, 1536, 768, 4096, 8192, 16384, 65536, 98304):
        assert size % row_bytes == 0  # no row spans two chunks
    assert row_chunk_size(row_bytes, size) is None  # not below the model's chunks: nothing to gain


def test_a_store_with_whole_chunk_tables_is_reused_with_a_note_and_rewritten_on_request(ts_models, tmp_path,
                                                                                        monkeypatch, caplog):
    plain = build_big_vocab_llama()
    with monkeypatch.context() as patch:  # a store written before tables had their own chunks
        patch.setattr(offload_module, "row_chunk_sizes", lambda blocks, size: {})
        old = ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path), model_id="m")
        old.cleanup_tensorstream()
    with ts.open_model(tmp_path, "m") as store:
        assert store.info(EMBED_WEIGHT)["chunk_size"] == 4 << 20
    caplog.set_level(logging.INFO, logger="tensorstream")
    reused = ts_models.track(ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path), model_id="m"))
    assert any("read by rows" in r.getMessage() and "rewrite=True" in r.getMessage() and EMBED_WEIGHT in r.getMessage()
               for r in caplog.records)
    ids = torch.tensor([[5, 9, 300, 7000]])
    ts_models.assert_equal(ts_models.generate(reused, ids), ts_models.generate(plain, ids), "reused store")
    reused.cleanup_tensorstream()
    rewritten = ts_models.track(ts.offload(copy.deepcopy(plain), ts_models.make_config(tmp_path), model_id="m",
                                           rewrite=True))
    with ts.open_model(tmp_path, "m") as store:
        assert store.info(EMBED_WEIGHT)["chunk_size"] == 64 << 10
    ts_models.assert_equal(ts_models.generate(rewritten, ids), ts_models.generate(plain, ids), "rewritten store")


def test_only_plain_untied_embeddings_qualify():
    model = Embeddings()
    partition = partition_model(model, 0)
    verdict = {b.name: qualifies_for_rows(model, b) for b in partition.streamed}
    assert verdict == {"plain": True, "max_norm": False, "scaled": False, "shared_a": False, "patched": False,
                       "linear": False}


def test_padding_idx_and_int32_ids_match_the_plain_module(tmp_path):
    torch.manual_seed(0)
    plain = Embeddings().eval()
    model = copy.deepcopy(plain)
    ts.offload(model, ts.Config(storage_path=str(tmp_path), min_layer_size=0, num_io_threads=2))
    assert ts.get_model_statistics(model)["row_read_blocks"] == ["plain"]
    for ids in (torch.tensor([[3, 3, 49, 0], [1, 3, 2, 49]]), torch.tensor([7], dtype=torch.int32),
                torch.tensor(5), torch.empty(0, dtype=torch.int64)):
        with torch.no_grad():
            assert torch.equal(model.plain(ids), plain.plain(ids)), ids
    with pytest.raises(IndexError):
        model.plain(torch.tensor([50]))
    with pytest.raises(IndexError):
        model.plain(torch.tensor([-1]))
    model.cleanup_tensorstream()
    assert "forward" not in model.plain.__dict__ and torch.equal(model.plain.weight, plain.plain.weight)


# ---- errors, cleanup, threads, tracing --------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [False, True], ids=["raw", "compressed"])
def test_corrupt_embedding_chunk_is_a_corruption_error_naming_the_tensor(ts_models, tmp_path, compression):
    _plain, model = ts_models.offload("llama", tmp_path, budget=0.5, compression_enabled=compression, model_id="m")
    with ts.open_model(tmp_path, "m") as store:
        data_path = store.data_path
    flip_bit(data_path, chunk_offsets(tmp_path, "m", EMBED_WEIGHT)[0] + 5)
    for _ in range(2):
        with pytest.raises(ts.CorruptionError) as caught:
            with torch.no_grad():
                ts_models.forward("llama", model, ts_models.input_ids())
        assert caught.value.tensor == EMBED_WEIGHT and EMBED_WEIGHT in str(caught.value)
    stats = ts.get_model_statistics(model)
    assert stats["checksum_failures"] == 2 and stats["row_reads"] == 0
    assert state_of(model).runtime.pinned_blocks() == 0


def test_cleanup_restores_the_weights_and_the_forward(ts_models, tmp_path):
    plain, model = ts_models.offload("llama", tmp_path, budget=0.1)
    ids = ts_models.input_ids()
    with torch.no_grad():
        expected = ts_models.forward("llama", plain, ids)
        ts_models.assert_equal(ts_models.forward("llama", model, ids), expected)
    model.cleanup_tensorstream()
    embed = model.model.embed_tokens
    assert "forward" not in embed.__dict__ and type(embed).forward is torch.nn.Embedding.forward
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert p.is_contiguous() and torch.equal(p, q), name
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("llama", model, ids), expected, "after cleanup")


def test_a_forward_after_close_is_a_config_error(ts_models, tmp_path):
    _plain, model = ts_models.offload("llama", tmp_path)
    state_of(model).close()
    with pytest.raises(ts.ConfigError):
        model.model.embed_tokens(torch.tensor([1, 2]))


def test_four_threads_read_rows_at_once(ts_models, tmp_path):
    plain, model = ts_models.offload("llama", tmp_path, budget=0.1)
    inputs = [ts_models.input_ids(batch=1 + i % 2, length=6 + i, seed=200 + i) for i in range(8)]
    with torch.no_grad():
        expected = [ts_models.forward("llama", plain, ids) for ids in inputs]
        expected_rows = [plain.model.embed_tokens(ids) for ids in inputs]
    results, rows, errors = [None] * 8, [None] * 8, []
    barrier = threading.Barrier(4)

    def worker(slot):
        try:
            barrier.wait()
            for i in range(slot, 8, 4):
                with torch.no_grad():
                    for _ in range(20):  # the embedding alone, many times: reads overlap
                        rows[i] = model.model.embed_tokens(inputs[i])
                    results[i] = ts_models.forward("llama", model, inputs[i])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(8):
        ts_models.assert_equal(rows[i], expected_rows[i], f"rows {i}")
        ts_models.assert_equal(results[i], expected[i], f"input {i}")
    assert ts.get_model_statistics(model)["row_reads"] == 8 * 21


def test_row_reads_are_read_events_in_the_trace(ts_models, tmp_path):
    path = tmp_path / "trace.json"
    _plain, model = ts_models.offload("llama", tmp_path / "store", budget=0.5, prefetch_strategy="none",
                                      trace_path=str(path))
    with torch.no_grad():
        ts_models.forward("llama", model, ts_models.input_ids())
    stats = ts.get_model_statistics(model)
    ts.write_trace(model)
    trace = json.loads(path.read_text())
    reads = [e for e in trace["traceEvents"] if e.get("cat") == "read"]
    embed_reads = [e for e in reads if e["args"]["block"] == EMBED]
    assert len(embed_reads) == 1 and embed_reads[0]["args"]["tensor"] == EMBED_WEIGHT
    assert embed_reads[0]["args"]["bytes"] == stats["row_bytes_read"]
    assert sum(e["args"]["bytes"] for e in reads) == stats["bytes_read"] == trace["otherData"]["bytes_read"]


def test_model_store_read_rows(ts_models, tmp_path):
    _plain, model = ts_models.offload("llama", tmp_path, model_id="m", compression_enabled=True)
    with ts.open_model(tmp_path, "m") as store:
        table = store.read(EMBED_WEIGHT)
        assert torch.equal(store.read_rows(EMBED_WEIGHT, [0, 5, 95]), table[[0, 5, 95]])
        assert store.read_rows(EMBED_WEIGHT, []).shape == (0, table.shape[1])
        for bad in ([96], [-1], [4, 4], [5, 2]):
            with pytest.raises(ts.ConfigError) as caught:
                store.read_rows(EMBED_WEIGHT, bad)
            assert caught.value.field == "rows"

"""The batching engine (tensorstream/serve/engine.py) on an offloaded model: tokens equal to the plain model's, one
stream of the weights per step for the whole batch, admission, cancellation, and recovery from a corrupt chunk."""

from __future__ import annotations

import asyncio
from typing import List

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("prometheus_client")

import tensorstream as ts  # noqa: E402
from tensorstream.metrics import ServingMetrics  # noqa: E402
from tensorstream.serve.engine import (BatchEngine, EngineOptions, GenerationFailed, RequestRejected,  # noqa: E402
                                       SamplingParams)
from tensorstream.testing.tiny_checkpoint import write_tiny_llama  # noqa: E402

PROMPTS = [[2, 5, 6, 7, 8], [2, 9, 10, 11], [2, 12, 13, 14, 15, 16, 17, 18, 19], [2, 20, 21], [2, 30, 31, 32, 33, 34]]
EOS = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=64, layers=4)


@pytest.fixture(scope="module")
def plain(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture
def offloaded(checkpoint, tmp_path):
    # A budget far below the model: every step streams every block.
    model = ts.from_pretrained(checkpoint, ts.Config(storage_path=tmp_path / "store", vram_budget_gb=1e-6,
                                                     min_layer_size=0))
    ts.get_model_statistics(model)  # the store is written and bound
    yield model
    model.cleanup_tensorstream()


def solo_greedy(plain, prompt: List[int], max_tokens: int) -> List[int]:
    with torch.no_grad():
        out = plain.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def padded_batch_greedy(plain, prompts: List[List[int]], max_tokens: int) -> List[List[int]]:
    """The plain model on the same batch: left-padded, with an attention mask, each row cut at its first EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = plain.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return rows


async def collect(engine: BatchEngine, prompt: List[int], params: SamplingParams) -> List[int]:
    tokens: List[int] = []
    async for delta in engine.generate(prompt, params):
        tokens.extend(delta.token_ids)
    return tokens


def run_all(engine: BatchEngine, prompts, params) -> List[List[int]]:
    async def main():
        return await asyncio.gather(*[collect(engine, p, params) for p in prompts])
    return asyncio.run(main())


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=(EOS,))


def test_max_batch_1_gives_each_request_the_plain_models_greedy_tokens(plain, offloaded):
    engine = BatchEngine(offloaded, EngineOptions(max_batch=1))
    engine.start()
    try:
        got = run_all(engine, PROMPTS, greedy(12))
    finally:
        engine.stop()
    assert got == [solo_greedy(plain, p, 12) for p in PROMPTS]


def test_batched_greedy_tokens_equal_the_plain_model_on_the_same_batch_with_fewer_weight_streams(plain, offloaded):
    registry = pytest.importorskip("prometheus_client").CollectorRegistry()
    metrics = ServingMetrics("tiny", registry)
    engine = BatchEngine(offloaded, EngineOptions(max_batch=8), metrics)
    ts.get_model_statistics(offloaded, reset=True)
    engine.start()
    try:
        got = run_all(engine, PROMPTS, greedy(12))
    finally:
        engine.stop()
    expected = padded_batch_greedy(plain, PROMPTS, 12)
    assert got == expected
    assert expected == [solo_greedy(plain, p, 12) for p in PROMPTS]  # and each one alone
    # Batched: far fewer forward steps than tokens, and each step streamed the model once.
    steps = registry.get_sample_value("tensorstream_batch_size_count", {"model": "tiny"})
    largest = max(b for b in (1, 2, 4, 8) if registry.get_sample_value(
        "tensorstream_batch_size_bucket", {"model": "tiny", "le": str(float(b))}) < steps) * 2
    tokens = sum(map(len, got))
    assert steps < tokens / 2 and largest >= 2
    stats = ts.get_model_statistics(offloaded)
    streamed = stats["streamed_bytes"]
    assert stats["bytes_read"] <= (steps + 1) * streamed


def test_sampling_with_a_seed_repeats_alone_and_differs_from_greedy(offloaded):
    engine = BatchEngine(offloaded, EngineOptions(max_batch=1))
    engine.start()
    try:
        params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=3)
        first, second = run_all(engine, [PROMPTS[0]], params)[0], run_all(engine, [PROMPTS[0]], params)[0]
        plain_greedy = run_all(engine, [PROMPTS[0]], greedy(16))[0]
    finally:
        engine.stop()
    assert first == second
    assert first != plain_greedy


@pytest.mark.parametrize("prompt, max_tokens, param, words", [
    ([2, 999], 4, "prompt", "outside the vocabulary"),
    ([2, -1], 4, "prompt", "outside the vocabulary"),
    ([], 4, "prompt", "empty"),
    ([2] * 250, 10, "max_tokens", "context of 256"),
    ([2] * 300, 1, "prompt", "context of 256"),
])
def test_requests_that_can_never_run_are_rejected_naming_the_field(offloaded, prompt, max_tokens, param, words):
    engine = BatchEngine(offloaded, EngineOptions(max_batch=2))
    with pytest.raises(RequestRejected) as caught:
        engine.check(prompt, greedy(max_tokens))
    assert caught.value.param == param and words in str(caught.value)


def test_a_request_larger_than_the_kv_cache_is_rejected(offloaded):
    engine = BatchEngine(offloaded, EngineOptions(kv_cache_gb=1e-5, page_size=16))
    with pytest.raises(RequestRejected, match="KV cache"):
        engine.check([2, 3], greedy(engine.cache_tokens))


def test_bad_engine_options_are_config_errors():
    for kwargs in ({"max_batch": 0}, {"kv_cache_gb": -1}, {"max_batch_tokens": 1.5}, {"page_size": True}):
        with pytest.raises(ts.ConfigError):
            EngineOptions(**kwargs)


def test_closing_a_stream_early_cancels_the_request_and_frees_its_place(offloaded):
    registry = pytest.importorskip("prometheus_client").CollectorRegistry()
    engine = BatchEngine(offloaded, EngineOptions(max_batch=1), ServingMetrics("tiny", registry))
    engine.start()

    async def main():
        stream = engine.generate(PROMPTS[0], greedy(200))
        first = await stream.__anext__()
        await stream.aclose()  # the client went away after one token
        # With max_batch 1, the next request only runs once the cancelled one left the batch.
        return first, await asyncio.wait_for(collect(engine, PROMPTS[1], greedy(4)), timeout=60)

    try:
        first, after = asyncio.run(main())
    finally:
        engine.stop()
    assert first.token_ids and len(after) == 4
    assert registry.get_sample_value("tensorstream_requests_total", {"model": "tiny", "outcome": "cancelled"}) == 1
    assert registry.get_sample_value("tensorstream_requests_running", {"model": "tiny"}) == 0


def test_a_corrupt_chunk_fails_the_batch_with_the_typed_error_and_the_engine_serves_the_next(plain, offloaded,
                                                                                           tmp_path):
    from store_faults import flip_bit

    state = offloaded._tensorstream_state
    victim = "model.layers.2.mlp.down_proj.weight"
    with ts.open_model(tmp_path / "store", state.model_id) as store:
        offset, data_path = store.info(victim)["raw_file_offset"], store.data_path
    engine = BatchEngine(offloaded, EngineOptions(max_batch=4))
    engine.start()
    try:
        flip_bit(data_path, offset + 3)

        async def batch():
            return await asyncio.gather(*[collect(engine, p, greedy(6)) for p in PROMPTS[:3]],
                                        return_exceptions=True)

        failures = asyncio.run(batch())
        assert all(isinstance(f, GenerationFailed) for f in failures), failures
        assert all(f.status == 503 and isinstance(f.cause, ts.CorruptionError) for f in failures)
        assert any(victim in str(f) for f in failures)
        flip_bit(data_path, offset + 3)  # repaired (as a rewrite of the store would)
        assert run_all(engine, [PROMPTS[0]], greedy(6)) == [solo_greedy(plain, PROMPTS[0], 6)]
        assert engine.running and engine.restarts == 1
        assert isinstance(engine.last_error, ts.CorruptionError)
    finally:
        engine.stop()

"""Hugging Face architectures offloaded with every layer streamed (min_layer_size=0): logits and generated tokens
are bit-for-bit those of the plain model. The full grid (backends x compression x budgets) runs on one model in
test_offload.py; here each architecture runs a reduced grid."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import tensorstream as ts  # noqa: E402

MODELS = ["gpt2", "llama", "mistral", "opt", "bert", "t5"]

# Every budget with every backend; compression alternates like a checkerboard (the full cross product, compression
# included, runs on Llama in test_offload.py).
BUDGETS = [0.1, 0.5, 1.0, 2.0]
BACKENDS = ["pread", "io_uring", "mmap"]
REDUCED_GRID = [(budget, backend, (i + j) % 2 == 1) for i, budget in enumerate(BUDGETS)
                for j, backend in enumerate(BACKENDS)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("budget, backend, compression", REDUCED_GRID,
                         ids=[f"{b}-{k}-{'zstd' if c else 'raw'}" for b, k, c in REDUCED_GRID])
def test_architecture_matches_plain_model(ts_models, tmp_path, name, budget, backend, compression):
    plain, model = ts_models.offload(name, tmp_path, budget=budget, backend=backend, compression_enabled=compression,
                                     verify_checksums=True)
    ids = ts_models.input_ids()
    with torch.no_grad():
        expected = ts_models.forward(name, plain, ids)
        for _ in range(2):  # the second pass runs with a warm (partly resident) engine
            ts_models.assert_equal(ts_models.forward(name, model, ids), expected, f"{name} forward")
    with torch.inference_mode():
        ts_models.assert_equal(ts_models.forward(name, model, ids), expected, f"{name} inference_mode")
    if name in ts_models.generative:
        ts_models.assert_equal(ts_models.generate(model, ids), ts_models.generate(plain, ids), f"{name} generate")
    stats = ts.get_model_statistics(model)
    assert stats["streamed_blocks"] >= 3 and stats["resident_blocks"] == 0
    assert stats["bytes_delivered"] > 0 and stats["checksum_failures"] == 0


EXPECTED_BLOCKS = {
    "gpt2": ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.h.2",
             "transformer.ln_f"],
    "mistral": ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"],
    # OPT registers final_layer_norm before its layers: blocks follow registration order.
    "opt": ["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.final_layer_norm",
            "model.decoder.layers.0", "model.decoder.layers.1"],
    "t5": ["shared", "encoder.block.0", "encoder.block.1", "encoder.final_layer_norm", "decoder.block.0",
           "decoder.block.1", "decoder.final_layer_norm"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_layers_are_blocks_and_tied_weights_share_one(ts_models, tmp_path, name):
    plain, model = ts_models.offload(name, tmp_path)
    stats = ts.get_model_statistics(model)
    assert list(stats["blocks"]) == EXPECTED_BLOCKS[name]
    with ts.open_model(tmp_path, stats["model_id"]) as store:
        assert store.block_names() == EXPECTED_BLOCKS[name]
        names = store.tensor_names()
    assert len(names) == len(set(names)) == len(list(plain.parameters()))  # each tied parameter stored once
    if name in ("gpt2", "opt", "t5"):
        embeddings = model.get_input_embeddings().weight
        assert model.get_output_embeddings().weight is embeddings  # still one Parameter, bound everywhere


def test_bert_tied_decoder_bias_and_nested_blocks(ts_models, tmp_path):
    """BERT's MLM head owns a bias tied to its decoder and calls a transform that streams on its own: the head's
    block stays pinned while the transform's block loads, so the budget must hold both (raised automatically)."""
    plain, model = ts_models.offload("bert", tmp_path, budget=0.01)
    stats = ts.get_model_statistics(model)
    head = stats["blocks"]["bert.embeddings.word_embeddings"]
    dense = stats["blocks"]["cls.predictions.transform.dense"]
    assert stats["budget_bytes"] >= head["slot_bytes"] + dense["slot_bytes"]
    ids = ts_models.input_ids()
    with torch.no_grad():
        ts_models.assert_equal(ts_models.forward("bert", model, ids), ts_models.forward("bert", plain, ids))

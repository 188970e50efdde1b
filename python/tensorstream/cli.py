"""The ``tensorstream`` command line (also ``python -m tensorstream``).

    tensorstream inspect PATH [MODEL]          models with sizes; with MODEL: its blocks and tensors
    tensorstream verify PATH [--model M]       check every chunk; exit 1 when anything is bad
    tensorstream cleanup PATH [--dry-run]      remove leftovers of dead writers
    tensorstream defrag PATH [--model M]       rewrite models in their recorded execution order
    tensorstream validate [--storage PATH]     the production validation suite (environment, storage, a model)
    tensorstream trace-plot TRACE.json [-o OUT.png] [--lanes compact|detailed]   draw a Chrome trace as a PNG
    tensorstream convert CHECKPOINT [--storage-path P] [--dtype bf16] [--compression-level N] [--replace]
                                               write a Hugging Face checkpoint into the store
    tensorstream serve MODEL [--storage-path P] [--budget-gb N] [--port 8000] [--max-batch 16]
                                               an OpenAI-compatible server batching over streamed weights

PATH defaults to $TENSORSTREAM_STORAGE_PATH. Exit status: 0 success, 1 the check found problems, 2 error (one
line on stderr). None of these commands imports torch, except validate, convert and serve; trace-plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .errors import TensorStreamError

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "-"


def _table(rows: List[List[str]], header: List[str], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(row: List[str]) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


# ---- commands ------------------------------------------------------------------------------------------------


def _model_summary(storage: Any, model_id: str) -> Dict[str, Any]:
    with storage.open(model_id) as model:
        tensors = [model.info(n) for n in model.tensor_names()]
        raw = sum(t["nbytes"] for t in tensors)
        compressed = sum(1 for t in tensors if t["compressed"])
        return {"model": model_id, "fingerprint": model.fingerprint, "blocks": len(model.block_names()),
                "tensors": len(tensors), "compressed_tensors": compressed, "chunk_size": model.chunk_size,
                "raw_bytes": raw, "stored_bytes": model.data_size,
                "compression_ratio": raw / model.data_size if model.data_size else None}


def _inspect_storage(storage: Any, as_json: bool) -> int:
    summaries: List[Dict[str, Any]] = []
    status = EXIT_OK
    for model_id in storage.models():
        try:
            summaries.append(_model_summary(storage, model_id))
        except TensorStreamError as error:
            summaries.append({"model": model_id, "error": _one_line(error)})
            status = EXIT_PROBLEMS
    if as_json:
        _print_json({"storage": str(storage.path), "store_id": storage.store_id, "models": summaries})
        return status
    print(f"storage {storage.path} (store id {storage.store_id}): {len(summaries)} model(s)")
    if not summaries:
        return status
    rows = []
    for s in summaries:
        if "error" in s:
            rows.append([s["model"], "-", "-", "-", "-", "-", f"UNREADABLE: {s['error']}"])
            continue
        rows.append([s["model"], str(s["blocks"]), str(s["tensors"]), _size(s["raw_bytes"]),
                     _size(s["stored_bytes"]), _ratio(s["raw_bytes"], s["stored_bytes"]),
                     f"{s['compressed_tensors']} compressed" if s["compressed_tensors"] else "raw"])
    print(_table(rows, ["model", "blocks", "tensors", "raw", "stored", "ratio", "storage"], right=(1, 2, 3, 4, 5)))
    return status


def _inspect_model(storage: Any, model_id: str, as_json: bool) -> int:
    with storage.open(model_id) as model:
        tensors = [model.info(n) for n in model.tensor_names()]
        blocks = [dict(model.block_info(b), name=b) for b in model.block_names()]
        raw = sum(t["nbytes"] for t in tensors)
        if as_json:
            _print_json({"model": model.model_id, "fingerprint": model.fingerprint, "chunk_size": model.chunk_size,
                         "data_size": model.data_size, "raw_bytes": raw, "metadata": model.metadata,
                         "blocks": blocks, "tensors": tensors})
            return EXIT_OK
        print(f"model {model.model_id}")
        print(f"  fingerprint  {model.fingerprint}")
        print(f"  chunk size   {_size(model.chunk_size)}")
        print(f"  data         {_size(model.data_size)} stored, {_size(raw)} raw "
              f"(ratio {_ratio(raw, model.data_size)})")
        for key, value in sorted(model.metadata.items()):
            shown = value if len(value) <= 60 else value[:57] + "..."
            print(f"  metadata     {key} = {shown}")
        print()
        print(_table([[b["name"], str(b["offset"]), _size(b["stored_bytes"]), _size(b["slot_size"]),
                       str(len(b["tensors"])), "raw" if b["all_raw"] else "compressed"] for b in blocks],
                     ["block", "offset", "stored", "slot", "tensors", "storage"], right=(1, 2, 3, 4)))
        print()
        print(_table([[t["name"], t["block_name"], t["dtype"], str(tuple(t["shape"])),
                       _size(t["nbytes"]), _size(t["stored_bytes"]), str(t["chunks"]),
                       "compressed" if t["compressed"] else "raw"] for t in tensors],
                     ["tensor", "block", "dtype", "shape", "raw", "stored", "chunks", "storage"], right=(4, 5, 6)))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .maintenance import resolve_storage_path
    from .store import Storage

    storage = Storage(resolve_storage_path(args.path), create=False)
    if args.model is None:
        return _inspect_storage(storage, args.json)
    return _inspect_model(storage, args.model, args.json)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .maintenance import verify_storage_integrity

    report = verify_storage_integrity(args.path, model=args.model)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from .maintenance import cleanup_orphaned_files

    report = cleanup_orphaned_files(args.path, dry_run=args.dry_run)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return EXIT_OK


def _cmd_defrag(args: argparse.Namespace) -> int:
    from .maintenance import defragment_storage

    report = defragment_storage(args.path, model=args.model)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return EXIT_PROBLEMS if report.failed else EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from .validate import format_table, passed, run_validation

    checks = run_validation(args.storage, read_test_bytes=args.read_test_mib << 20, model_check=not args.no_model)
    if args.json:
        _print_json({"ok": passed(checks), "checks": [c.to_dict() for c in checks]})
    else:
        print(format_table(checks))
    return EXIT_OK if passed(checks) else EXIT_PROBLEMS


def _cmd_trace_plot(args: argparse.Namespace) -> int:
    from .trace_plot import plot_trace

    output = args.output
    if output is None:
        stem = args.trace[:-5] if args.trace.endswith(".json") else args.trace
        output = stem + ".png"
    try:
        written = plot_trace(args.trace, output, lanes=args.lanes)
    except (ImportError, ValueError) as error:  # no matplotlib; not a Chrome trace
        print(f"tensorstream trace-plot: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    print(written)
    return EXIT_OK


DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}


def _cmd_convert(args: argparse.Namespace) -> int:
    from .config import Config
    from .torch.pretrained import convert, default_storage_path

    import transformers

    if args.compression_level is not None and not 0 <= args.compression_level <= 9:
        raise _config_error(f"--compression-level {args.compression_level} is outside 0..9", "compression_level")
    model_class = None
    if args.model_class is not None:
        model_class = getattr(transformers, args.model_class, None)
        if not isinstance(model_class, type):
            raise _config_error(f"--model-class {args.model_class!r} is not a transformers class", "model_class")
    level = args.compression_level or 0
    config = Config(storage_path=args.storage_path or default_storage_path(), compression_enabled=level > 0,
                    compression_level=level or 5, min_layer_size=args.min_layer_size,
                    progress=False if args.no_progress else None)
    result = convert(args.checkpoint, config, torch_dtype=args.dtype, model_class=model_class,
                     model_id=args.model_id, replace=args.replace)
    if args.json:
        _print_json(result.to_dict())
        return EXIT_OK
    if result.outcome == "already_existed":
        print(f"{result.model_id}: already in {result.storage_path}, nothing written (--replace rewrites it)")
    else:
        rate = f", {result.raw_bytes / result.seconds / 1e9:.2f} GB/s" if result.seconds > 0 else ""
        print(f"{result.model_id}: {result.outcome} in {result.storage_path}: {_size(result.raw_bytes)} -> "
              f"{_size(result.stored_bytes)} ({_ratio(result.raw_bytes, result.stored_bytes)}) in "
              f"{result.seconds:.1f} s{rate}")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, serve
    from .serve.engine import EngineOptions

    import os

    model = args.model or os.environ.get("TENSORSTREAM_MODEL")
    if not model:
        raise _config_error("serve needs a MODEL: a checkpoint folder, a cached hub id or a store model id "
                            "(argument, or TENSORSTREAM_MODEL)", "model")
    if not 0 <= args.port <= 65535:
        raise _config_error(f"--port {args.port} is outside 0..65535", "port")
    EngineOptions(max_batch=args.max_batch, kv_cache_gb=args.kv_cache_gb, max_batch_tokens=args.max_batch_tokens)
    options = ServeOptions(model=model, storage_path=args.storage_path, budget_gb=args.budget_gb,
                           served_name=args.served_model_name, tokenizer=args.tokenizer, dtype=args.dtype,
                           max_batch=args.max_batch, kv_cache_gb=args.kv_cache_gb,
                           max_batch_tokens=args.max_batch_tokens, verify=not args.no_verify)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(options, host=args.host, port=args.port, log_level=args.log_level)
    return EXIT_OK


def _config_error(message: str, field: str) -> TensorStreamError:
    from .errors import ConfigError

    return ConfigError(message, field=field)


# ---- entry point ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorstream",
        description="Inspect and maintain TensorStream storage directories.",
        epilog="PATH defaults to $TENSORSTREAM_STORAGE_PATH. Exit status: 0 ok, 1 problems found, 2 error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("path", metavar="PATH", nargs="?", default=None, help="storage directory")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(func=func)
        return p

    p = add("inspect", "list the models of a storage directory, or the blocks and tensors of one model",
            _cmd_inspect)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help="model id to show in detail")
    p = add("verify", "check every chunk, the padding and the fingerprint of every model (exit 1 if any is bad)",
            _cmd_verify)
    p.add_argument("--model", "-m", default=None, help="verify only this model")
    p = add("cleanup", "remove leftovers of dead writers and files no manifest references", _cmd_cleanup)
    p.add_argument("--dry-run", "-n", action="store_true", help="only list what would be removed")
    p = add("defrag", "rewrite models with their blocks in recorded execution order", _cmd_defrag)
    p.add_argument("--model", "-m", default=None, help="defragment only this model")
    p = sub.add_parser("validate", help="run the production validation suite (exit 1 if any check fails)",
                       description="Checks the environment (Python, PyTorch, the _core extension, io_uring, CPUs, "
                       "RAM), the storage path (creatable, writable, free space, read speed with the page cache "
                       "evicted) and a tiny Llama end to end (offloaded with half its weights: same greedy tokens "
                       "as the plain model, store verifies). Prints PASS/FAIL/INFO per check.")
    p.add_argument("--storage", "-s", metavar="PATH", default=None,
                   help="storage directory to validate (default: $TENSORSTREAM_STORAGE_PATH, else a temporary one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--read-test-mib", type=int, default=256, help="size of the read-speed test file (0: skip)")
    p.add_argument("--no-model", action="store_true", help="skip the end-to-end model check")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("trace-plot", help="draw a TensorStream Chrome trace as a PNG timeline",
                       description="Draws the Chrome trace a model writes with Config.trace_path / "
                       "TENSORSTREAM_TRACE as a PNG timeline (time in ms) with totals under the title: compute "
                       "and stall seconds, bytes read and the read rate, and the share of wall time compute waited "
                       "while the disk was idle. Needs matplotlib.")
    p.add_argument("trace", metavar="TRACE.json", help="the trace file")
    p.add_argument("--output", "-o", metavar="OUT.png", default=None,
                   help="where to write the PNG (default: TRACE with .png instead of .json)")
    p.add_argument("--lanes", choices=("compact", "detailed"), default="compact",
                   help="compact (default): compute coloured by block, stall, all reads in flight in one lane "
                   "coloured by block, verify, decompress, transfer; detailed: one lane per thread and kind, "
                   "reads per I/O lane")
    p.set_defaults(func=_cmd_trace_plot)
    p = sub.add_parser("convert", help="write a Hugging Face checkpoint into a store (no model is run)",
                       description="Writes a checkpoint folder (config.json and safetensors, single or sharded) or a "
                       "hub id in the local Hugging Face cache into the store, one block at a time, under the model "
                       "id tensorstream.from_pretrained derives for the same settings: a later from_pretrained "
                       "writes nothing. Prints the model id, sizes and speed.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder or cached hub id")
    p.add_argument("--storage-path", "-s", metavar="PATH", default=None,
                   help="storage directory (default: $TENSORSTREAM_STORAGE_PATH, else ~/.cache/tensorstream/store)")
    p.add_argument("--dtype", type=lambda text: DTYPE_NAMES.get(text.lower(), text), default=None,
                   metavar="DTYPE", help="cast while writing: bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--compression-level", type=int, default=None, metavar="N",
                   help="0 (default) stores raw; 1-9 compress (floats: the exponent codec; docs/configuration.md)")
    p.add_argument("--model-id", default=None, help="store id (default: derived from the checkpoint and settings)")
    p.add_argument("--model-class", default=None, metavar="NAME",
                   help="transformers class to build, e.g. LlamaForCausalLM (default: the config's architecture)")
    p.add_argument("--min-layer-size", type=int, default=1 << 20, metavar="BYTES",
                   help="blocks smaller than this stay resident (as Config.min_layer_size; default 1 MiB)")
    p.add_argument("--replace", action="store_true", help="rewrite the model even when the store holds it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, batching concurrent requests",
                       description="Serves MODEL (a checkpoint folder, a hub id in the local cache, or the id of a "
                       "model in the store) on /v1/completions, /v1/chat/completions, /v1/models, /health, /ready "
                       "and /metrics. Concurrent requests share each forward step (continuous batching), so a step "
                       "streams the weights once for all of them. docs/serving.md.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="checkpoint folder, cached hub id, or a store model id (default: $TENSORSTREAM_MODEL)")
    p.add_argument("--storage-path", "-s", metavar="PATH", default=None,
                   help="storage directory (default: $TENSORSTREAM_STORAGE_PATH, else ~/.cache/tensorstream/store)")
    p.add_argument("--budget-gb", type=float, default=None, metavar="N",
                   help="memory budget for the weights (default: $TENSORSTREAM_VRAM_BUDGET, else a quarter of them)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests per forward step (default 16; 1 serves one request at a time)")
    p.add_argument("--kv-cache-gb", type=float, default=0.5, metavar="N", help="the most the KV cache may take, allocated up front; capped at what --max-batch full contexts use "
                   "(default 0.5)")
    p.add_argument("--max-batch-tokens", type=int, default=512, metavar="N",
                   help="tokens per forward step; longer prompts are prefilled in pieces (default 512)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients pass as `model` (default: MODEL as given)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer folder (default: the checkpoint's; needed for text prompts of a store model id)")
    p.add_argument("--dtype", type=lambda text: DTYPE_NAMES.get(text.lower(), text), default=None,
                   metavar="DTYPE", help="bf16, fp16 or fp32 (default: the checkpoint's)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not verify the model's chunks in the store before serving")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TensorStreamError as error:
        print(f"tensorstream {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a plain OS failure outside the engine (e.g. stdout closed)
        print(f"tensorstream {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyError as error:  # an unknown tensor or block name
        print(f"tensorstream {args.command}: error: {error.args[0] if error.args else error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


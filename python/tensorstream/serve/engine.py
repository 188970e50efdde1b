"""The batching engine: concurrent requests share each forward step, so a step streams every block once for the
whole batch.

We do not schedule ourselves. transformers ships continuous batching (``model.init_continuous_batching()``: a FIFO
scheduler over a paged KV cache, the engine behind ``transformers serve``); an offloaded model runs under it
unchanged, because our hooks sit on the modules, whatever the batch looks like. This module adds what serving
streamed weights needs on top of it:

* **admission by the budget**: the KV cache is sized in bytes (``kv_cache_gb``) next to the weights' budget; a
  request that could never fit (prompt + ``max_tokens`` beyond the model's context or the whole cache) is refused
  up front instead of waiting forever; ``max_batch`` caps the requests per step.
* **one sampler for greedy and sampled requests**: the manager samples with per-request temperature / top-k /
  top-p; a greedy request is top-k 1 (its token is the argmax, as in ``generate(do_sample=False)``).
* **typed errors and recovery**: a forward that fails (a corrupt chunk: :class:`~tensorstream.CorruptionError`)
  ends transformers' generation loop and fails every request in the batch. The engine hands each of them the typed
  error, starts a fresh loop, and keeps serving; :attr:`BatchEngine.last_error` tells ``/health`` what happened.
* **our metrics**: :class:`~tensorstream.metrics.ServingMetrics` per request and per step.

Thread-safety: :meth:`BatchEngine.generate` runs on an asyncio event loop (any number of concurrent calls);
:meth:`start` / :meth:`stop` from one controlling thread. The manager's loop runs on its own thread; a pump thread
routes its outputs to the waiting coroutines with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import threading
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, TensorStreamError

logger = logging.getLogger("tensorstream.serve")

__all__ = ["EngineOptions", "SamplingParams", "Delta", "BatchEngine", "RequestRejected", "GenerationFailed"]

# transformers' sampler builds a per-request processor only for settings whose *default* is not neutral (a
# temperature of 1.0 or a top_p of 1.0 would build none, and the request's own value would be ignored). These
# defaults are never used: every request sets all three.
_SAMPLER_DEFAULTS = {"temperature": 0.5, "top_p": 0.5}


class RequestRejected(TensorStreamError, ValueError):
    """A request the engine will not run (too long for the context or the KV cache, a bad token id): a 400."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationFailed(TensorStreamError):
    """A request failed while it ran. ``cause`` is the exception of the failed step (a CorruptionError names the
    tensor and chunk); ``status`` the HTTP status the server answers with (503 for store errors, 500 otherwise)."""

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.status = 503 if isinstance(cause, (TensorStreamError, OSError)) else 500


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the engine batches. ``max_batch``: requests per step (1: one request at a time). ``kv_cache_gb``: the
    paged KV cache's size. ``max_batch_tokens``: tokens per forward step (a longer prompt is prefilled in pieces;
    each piece streams the weights once, so larger is better while activations fit). ``page_size``: tokens per KV
    page."""

    max_batch: int = 16
    kv_cache_gb: float = 0.5
    max_batch_tokens: int = 512
    page_size: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_batch_tokens", "page_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}", field=name)
        if isinstance(self.kv_cache_gb, bool) or not isinstance(self.kv_cache_gb, (int, float)) \
                or not math.isfinite(self.kv_cache_gb) or self.kv_cache_gb <= 0:
            raise ConfigError(f"kv_cache_gb must be a number > 0, got {self.kv_cache_gb!r}", field="kv_cache_gb")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings. ``temperature`` 0 is greedy. ``stop_token_ids`` end the request (the
    token is kept in the output, as ``generate`` keeps its EOS)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class Delta:
    """What a request produced since the last delta: new token ids, and ``finish_reason`` ("stop" for a stop token,
    "length" for ``max_tokens``) on the last one."""

    token_ids: List[int]
    finish_reason: Optional[str] = None


class _Waiter:
    """A request's mailbox: the pump thread posts outputs into the request's event loop."""

    __slots__ = ("loop", "queue", "metrics", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Any) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[Any]" = asyncio.Queue()
        self.metrics = metrics
        self.sent = 0

    def post(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values one token holds in the cache, over all layers."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = model.dtype.itemsize if hasattr(model.dtype, "itemsize") else 4
    return 2 * cfg.num_hidden_layers * heads * head_dim * element


def context_length(model: Any) -> Optional[int]:
    cfg = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class BatchEngine:
    """Runs generation requests for one model in continuous batches. See the module docstring."""

    def __init__(self, model: Any, options: EngineOptions = EngineOptions(), metrics: Any = None) -> None:
        if not callable(getattr(model, "init_continuous_batching", None)):
            raise ConfigError(f"{type(model).__name__} cannot generate in batches (transformers' continuous "
                              "batching needs a generative Hugging Face model)", field="model")
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            ContinuousBatchingConfig = None
        if ContinuousBatchingConfig is None or "per_request_processors" not in getattr(
                ContinuousBatchingConfig, "__dataclass_fields__", {}):
            raise ConfigError("tensorstream serve needs a transformers with continuous batching and per-request "
                              "sampling (5.x): pip install -U 'tensorstream[serve]'", field="transformers")
        self.model = model
        self.options = options
        self.metrics = metrics
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.context = context_length(model)
        per_token = kv_bytes_per_token(model)
        # kv_cache_gb is a ceiling: never more pages than max_batch full contexts can use (transformers allocates
        # the whole cache, and an attention mask over it, up front).
        affordable = int(options.kv_cache_gb * (1 << 30)) // (per_token * options.page_size)
        usable = -(-options.max_batch * (self.context or 4096) // options.page_size)
        self.num_blocks = max(1, min(affordable, usable))
        self.cache_tokens = self.num_blocks * options.page_size
        self.last_error: Optional[BaseException] = None
        self.restarts = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _manager and _waiters
        self._manager: Any = None
        self._waiters: Dict[str, _Waiter] = {}
        self._pump: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._step_hook: Any = None

    # -- life cycle ------------------------------------------------------------------------------------------------

    def _new_manager(self) -> Any:
        import copy

        from transformers import ContinuousBatchingConfig

        generation_config = copy.deepcopy(self.model.generation_config)
        generation_config.do_sample = True
        generation_config.top_k = self.vocab_size
        generation_config.update(**_SAMPLER_DEFAULTS)
        generation_config.max_new_tokens = max(1, self.context or 1)
        if generation_config.eos_token_id is None:
            generation_config.eos_token_id = -1
        # No CUDA graphs (our hooks run host code between blocks), no flash switch (the model's attention stays the
        # one it was offloaded with), no prefix sharing (a shared page would outlive its request's budget check).
        cb_config = ContinuousBatchingConfig(
            page_size=self.options.page_size, num_blocks=self.num_blocks,
            max_batch_tokens=self.options.max_batch_tokens, max_requests_per_batch=self.options.max_batch,
            per_request_processors=True, allow_block_sharing=False, auto_switch_to_flash=False, use_cuda_graph=False,
            cpu_offload_space=0.0)
        manager = self.model.init_continuous_batching(generation_config=generation_config,
                                                      continuous_batching_config=cb_config)
        manager.start()
        # The loop seeds torch's generator when it builds its batch processor; a request's seed must come after.
        deadline = time.monotonic() + 60
        while manager.batch_processor is None and manager.is_running() and time.monotonic() < deadline:
            time.sleep(0.005)
        return manager

    def start(self) -> None:
        """Starts the generation loop and the pump thread."""
        with self._lock:
            if self._manager is not None:
                return
            self._manager = self._new_manager()
        self._step_hook = self.model.register_forward_pre_hook(self._on_step)
        self._stopping.clear()
        self._pump = threading.Thread(target=self._pump_outputs, name="tensorstream-serve-pump", daemon=True)
        self._pump.start()

    def stop(self) -> None:
        """Stops the loop; requests still running get a GenerationFailed."""
        self._stopping.set()
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, timeout=30)
            manager.destroy()
        if self._pump is not None:
            self._pump.join(timeout=30)
            self._pump = None
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self._fail_waiters(GenerationFailed("the server is shutting down"))

    @property
    def running(self) -> bool:
        manager = self._manager
        return manager is not None and manager.is_running()

    def load(self) -> Tuple[int, int]:
        """(requests running, requests waiting) in the batching manager."""
        manager = self._manager
        processor = getattr(manager, "batch_processor", None)
        scheduler = getattr(processor, "scheduler", None)
        if scheduler is None:
            return 0, 0
        return len(scheduler.active_requests), len(scheduler.waiting_requests)

    # -- requests ----------------------------------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises RequestRejected when the request can never run; otherwise nothing."""
        if not prompt_ids:
            raise RequestRejected("the prompt is empty", param="prompt")
        for token in prompt_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise RequestRejected(f"token id {token!r} is outside the vocabulary (0..{self.vocab_size - 1})",
                                      param="prompt")
        total = len(prompt_ids) + params.max_tokens
        if self.context is not None and total > self.context:
            raise RequestRejected(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is "
                                  f"{total} tokens, more than the model's context of {self.context}",
                                  param="max_tokens" if len(prompt_ids) < self.context else "prompt")
        if total > self.cache_tokens:
            raise RequestRejected(f"the prompt plus max_tokens is {total} tokens, more than the KV cache holds "
                                  f"({self.cache_tokens} tokens at kv_cache_gb={self.options.kv_cache_gb})",
                                  param="max_tokens")

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields the request's tokens as they come. Closing the iterator early (a client that went away) cancels
        the request and frees its place in the batch. Raises RequestRejected before anything runs, GenerationFailed
        when a step fails."""
        prompt_ids = list(prompt_ids)
        self.check(prompt_ids, params)
        metrics = self.metrics.request(len(prompt_ids)) if self.metrics is not None else None
        if params.max_tokens == 0:
            if metrics is not None:
                metrics.started()
                metrics.finished("length")
            yield Delta([], "length")
            return
        request_id = f"ts-{next(self._ids)}"
        waiter = _Waiter(asyncio.get_running_loop(), metrics)
        outcome = "error"
        try:
            self._submit(request_id, waiter, prompt_ids, params)
            while True:
                item = await waiter.queue.get()
                if isinstance(item, BaseException):
                    raise item
                tokens = item.generated_tokens[waiter.sent:]
                waiter.sent = len(item.generated_tokens)
                if metrics is not None and tokens:
                    metrics.started()
                    metrics.token(len(tokens))
                if item.is_finished():
                    reason = "stop" if tokens and tokens[-1] in params.stop_token_ids else "length"
                    outcome = reason
                    yield Delta(tokens, reason)
                    return
                if tokens:
                    yield Delta(tokens)
        except (GeneratorExit, asyncio.CancelledError):
            if outcome == "error":  # closed before its end (after it, the outcome is already stop / length)
                outcome = "cancelled"
            raise
        finally:
            with self._lock:
                self._waiters.pop(request_id, None)
                manager = self._manager
            if outcome == "cancelled" and manager is not None:
                manager.cancel_request(request_id)
            if metrics is not None:
                metrics.finished(outcome)

    def _submit(self, request_id: str, waiter: _Waiter, prompt_ids: List[int], params: SamplingParams) -> None:
        if params.greedy:
            sampling = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            sampling = {"temperature": float(params.temperature), "top_k": self.vocab_size,
                        "top_p": float(params.top_p)}
        eos = list(params.stop_token_ids) or [-1]
        # A loop that just died of a failed step refuses requests until _recover (on the pump thread) has failed its
        # batch and started the next loop: wait for that loop rather than fail a request that never ran (three
        # concurrent requests over a corrupt chunk must all get the chunk's 503, not one a 500 for the restart).
        deadline = time.monotonic() + 60
        while True:
            with self._lock:
                manager = self._manager
                if manager is None or self._stopping.is_set():
                    raise GenerationFailed("the engine is not running")
                if params.seed is not None:
                    import torch

                    # Sampled tokens come from one generator for the whole batch: a seed makes a request
                    # repeatable when it runs alone (--max-batch 1), not when others share its steps.
                    torch.manual_seed(params.seed)
                self._waiters[request_id] = waiter
                accepted = manager.add_request(prompt_ids, request_id=request_id, max_new_tokens=params.max_tokens,
                                               streaming=True, eos_token_id=eos, **sampling)
                if accepted is None:
                    self._waiters.pop(request_id, None)
            if accepted is not None:
                return
            if time.monotonic() >= deadline:
                raise GenerationFailed("the generation loop is restarting after an error; retry the request",
                                       cause=self.last_error)
            time.sleep(0.02)

    # -- the pump thread -------------------------------------------------------------------------------------------

    def _on_step(self, module: Any, args: Any) -> None:
        if self.metrics is not None:
            running, _waiting = self.load()
            self.metrics.step(max(1, running))

    def _pump_outputs(self) -> None:
        while not self._stopping.is_set():
            manager = self._manager
            if manager is None:
                return
            output = manager.get_result(timeout=0.1)
            if output is None:
                if not manager.is_running() and not self._stopping.is_set():
                    self._recover(manager, None)
                continue
            if output.error is not None:
                self._recover(manager, output)
                continue
            with self._lock:
                waiter = self._waiters.get(output.request_id)
            if waiter is not None:
                waiter.post(output)

    def _recover(self, manager: Any, failed_output: Any) -> None:
        """A step failed: transformers' loop fails the batch and stops. Give every request of it the typed cause,
        then start a new loop for the next requests."""
        deadline = time.monotonic() + 30
        while manager.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)  # the loop records its fatal error as it exits
        cause = manager.background_thread_status.fatal_error
        if cause is None and manager.is_running():  # one request failed, the loop lives on
            with self._lock:
                waiter = self._waiters.get(failed_output.request_id) if failed_output is not None else None
            if waiter is not None:
                waiter.post(GenerationFailed(f"the request failed: {failed_output.error}"))
            return
        self.last_error = cause
        message = f"a forward step failed: {type(cause).__name__}: {cause}" if cause else "the generation loop ended"
        logger.error("serve: %s; failing the requests of that batch and restarting the generation loop", message)
        with self._lock:
            if self._manager is not manager or self._stopping.is_set():
                return
            try:
                manager.stop(block=True, timeout=30)
                manager.destroy()
            except Exception:  # noqa: BLE001 - it already failed; the new loop matters
                logger.debug("serve: stopping the failed loop", exc_info=True)
            waiters, self._waiters = self._waiters, {}
            self._manager = self._new_manager()
            self.restarts += 1
        for waiter in waiters.values():
            waiter.post(GenerationFailed(message, cause=cause))

    def _fail_waiters(self, error: BaseException) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.post(error)

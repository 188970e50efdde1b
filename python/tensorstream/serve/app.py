"""The HTTP server: OpenAI's completions and chat completions (plain and server-sent events), models, health,
readiness and Prometheus metrics, over a :class:`~tensorstream.serve.engine.BatchEngine`.

The model loads on a thread after the server starts listening, so that the orchestrator's probes get answers from
the first second: ``/health`` is 503 with the reason (``writing the store``, ``verifying the store``, or the error
that stopped the load) until the model serves; ``/ready`` is 200 once the store is open and verified and the engine
runs. ``/health`` does not run a forward pass: with streamed weights that reads the whole model, and a probe every
few seconds would compete with the requests. A failed forward step (a corrupt chunk) fails the requests of its
batch with a 503 naming the chunk, and the engine restarts its loop: the server stays up and healthy.

Thread-safety: route handlers run on uvicorn's event loop; :class:`Service` is written by the loading thread before
it sets its state to "serving", and read by the handlers after.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, TensorStreamError
from .engine import BatchEngine, Delta, EngineOptions, GenerationFailed, RequestRejected, SamplingParams
from .loader import ServeOptions, load_model, load_tokenizer
from .protocol import ChatCompletionRequest, CompletionRequest, error_body

logger = logging.getLogger("tensorstream.serve")

__all__ = ["Service", "create_app"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _failure(error: GenerationFailed) -> ApiError:
    cause = error.cause
    message = str(error) if cause is None or str(cause) in str(error) else f"{error}: {cause}"
    kind = "service_unavailable" if error.status == 503 else "server_error"
    code = type(cause).__name__ if cause is not None else None
    return ApiError(error.status, message, kind=kind, code=code)


class Service:
    """The served model and its state: "loading" → "serving", or "failed" with the error that stopped the load."""

    def __init__(self, options: ServeOptions, registry: Any = None) -> None:
        from ..metrics import ServingMetrics, _prometheus, register

        prometheus_client = _prometheus()
        self.options = options
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        register(self.registry)
        self.name = options.served_name or options.model
        self.metrics = ServingMetrics(self.name, self.registry)
        self.state = "loading"
        self.reason = "loading the model"
        self.model: Any = None
        self.model_id: Optional[str] = None
        self.tokenizer: Any = None
        self.engine: Optional[BatchEngine] = None
        self.created = int(time.time())
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, name: str, engine_options: EngineOptions = EngineOptions(),
                  registry: Any = None) -> "Service":
        """A service over a model already offloaded in this process (tests, notebooks); starts serving at once."""
        service = cls(ServeOptions(model=name, max_batch=engine_options.max_batch,
                                   kv_cache_gb=engine_options.kv_cache_gb,
                                   max_batch_tokens=engine_options.max_batch_tokens, verify=False), registry)
        service._serve(model, tokenizer, getattr(getattr(model, "_tensorstream_state", None), "model_id", None))
        return service

    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="tensorstream-serve-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self.reason = f"loading {self.options.model} (writing the store if it does not hold the model yet)"
            model, model_id, checkpoint = load_model(self.options)
            tokenizer = load_tokenizer(self.options, checkpoint)
            if self.options.verify:
                from ..maintenance import verify_storage_integrity

                self.reason = f"verifying model {model_id} in the store"
                report = verify_storage_integrity(self.options.config().storage_path, model_id)
                if not report.ok:
                    raise ConfigError(f"the store fails verification: {report}", field="storage_path")
            self._serve(model, tokenizer, model_id)
        except Exception as error:  # noqa: BLE001 - reported by /health; the process stays up to say why
            logger.exception("serve: loading %s failed", self.options.model)
            self.state, self.reason = "failed", f"{type(error).__name__}: {error}"

    def _serve(self, model: Any, tokenizer: Any, model_id: Optional[str]) -> None:
        options = EngineOptions(max_batch=self.options.max_batch, kv_cache_gb=self.options.kv_cache_gb,
                                max_batch_tokens=self.options.max_batch_tokens)
        engine = BatchEngine(model, options, self.metrics)
        engine.start()
        self.model, self.tokenizer, self.model_id, self.engine = model, tokenizer, model_id, engine
        self.state, self.reason = "serving", "serving"
        logger.info("serve: %s serving (store id %s, max batch %d, KV cache %d tokens)", self.name, model_id,
                    options.max_batch, engine.cache_tokens)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        cleanup = getattr(self.model, "cleanup_tensorstream", None)
        if callable(cleanup):
            cleanup()

    # -- what the routes ask -------------------------------------------------------------------------------------

    def health(self) -> Tuple[int, Dict[str, Any]]:
        body: Dict[str, Any] = {"status": self.state, "model": self.name}
        if self.state != "serving":
            body["reason"] = self.reason
            return 503, body
        engine = self.engine
        if engine is None or not engine.running:
            body.update(status="unhealthy", reason="the generation loop is not running")
            return 503, body
        running, waiting = engine.load()
        body.update(requests_running=running, requests_waiting=waiting, restarts=engine.restarts,
                    kv_cache_tokens=engine.cache_tokens)
        if engine.last_error is not None:
            body["last_error"] = f"{type(engine.last_error).__name__}: {engine.last_error}"
        return 200, body

    def ready(self) -> Tuple[int, Dict[str, Any]]:
        status, body = self.health()
        return (200 if status == 200 else 503), {"ready": status == 200, **body}

    def require_serving(self) -> BatchEngine:
        if self.state != "serving" or self.engine is None:
            raise ApiError(503, f"the model is not serving yet: {self.reason}", kind="service_unavailable")
        return self.engine

    def check_model(self, requested: Optional[str]) -> None:
        if requested is not None and requested != self.name:
            raise ApiError(404, f"model '{requested}' is not served here (this server serves '{self.name}')",
                           kind="invalid_request_error", param="model", code="model_not_found")

    def stop_token_ids(self) -> Tuple[int, ...]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    def encode(self, text: str) -> List[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: List[Dict[str, str]]) -> List[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this server has no tokenizer, so no chat template", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "the model's tokenizer has no chat template: use /v1/completions", param="messages")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(encoded, "keys") and "input_ids" in encoded:  # transformers 5 returns a BatchEncoding
            encoded = encoded["input_ids"]
        return list(encoded)


class TextAssembler:
    """Turns generated token ids into text deltas, holding back what may still change: a partial UTF-8 character,
    or the start of a stop string. A stop string ends the text before it."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: List[int] = []
        self.emitted = 0
        self.stopped = False

    def feed(self, token_ids: Sequence[int], final: bool) -> str:
        self.ids.extend(token_ids)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                text, self.stopped, final = text[:at], True, True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            if self.stops:
                end = max(self.emitted, end - (max(len(s) for s in self.stops) - 1))
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


def _params(body: Any, limit: Optional[int], service: Service) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    return SamplingParams(max_tokens=DEFAULT_MAX_TOKENS if limit is None else limit, temperature=temperature,
                          top_p=1.0 if body.top_p is None else float(body.top_p), seed=body.seed,
                          stop_token_ids=service.stop_token_ids())


def _usage(prompt: int, completion: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _first(stream: AsyncIterator[Delta]) -> Optional[Delta]:
    """The first delta, so that errors before any token get a real status code instead of a broken stream."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except RequestRejected as error:
        raise ApiError(400, str(error), param=error.param) from None
    except GenerationFailed as error:
        raise _failure(error) from None


def create_app(service: Service) -> Any:
    """The FastAPI application over ``service`` (see the module docstring for the routes)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..metrics import _prometheus

    app = FastAPI(title="TensorStream", version=_version())
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.message, kind=error.kind, param=error.param, code=error.code),
                            status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = (error.errors() or [{}])[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        else:
            param = next((part for part in location if not part.isdigit()), None) if location else None
            where = ".".join(location) or "body"
            message = f"{where}: {first.get('msg', 'invalid value')}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), kind="invalid_request_error"), status_code=error.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status, body = service.ready()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        prometheus_client = _prometheus()
        return Response(prometheus_client.generate_latest(service.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "tensorstream"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        engine = service.require_serving()
        service.check_model(body.model)
        prompt_ids = service.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        if body.stop_strings() and service.tokenizer is None:
            raise ApiError(400, "stop strings need a tokenizer, which this server does not have", param="stop")
        return await _run(engine, prompt_ids, _params(body, body.max_tokens, service), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        engine = service.require_serving()
        service.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = service.encode_chat(messages)
        return await _run(engine, prompt_ids, _params(body, body.token_limit(), service), body, chat=True)

    async def _run(engine: BatchEngine, prompt_ids: List[int], params: SamplingParams, body: Any,
                   chat: bool) -> Any:
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        stream = engine.generate(prompt_ids, params)
        first = await _first(stream)
        text = TextAssembler(service.tokenizer, body.stop_strings())
        if body.stream:
            return StreamingResponse(_events(stream, first, text, request_id, len(prompt_ids), body, chat),
                                     media_type="text/event-stream")
        generated: List[int] = []
        parts: List[str] = []
        finish = None
        delta = first
        try:
            while delta is not None:
                generated.extend(delta.token_ids)
                parts.append(text.feed(delta.token_ids, final=delta.finish_reason is not None))
                finish = "stop" if text.stopped else delta.finish_reason
                if finish is not None:
                    break
                delta = await stream.__anext__()
        except GenerationFailed as error:
            raise _failure(error) from None
        finally:
            await stream.aclose()
        choice: Dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": generated}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(parts)}
        else:
            choice["text"] = "".join(parts)
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": service.name, "choices": [choice],
                "usage": _usage(len(prompt_ids), len(generated))}

    async def _events(stream: AsyncIterator[Delta], first: Optional[Delta], text: TextAssembler, request_id: str,
                      prompt_tokens: int, body: Any, chat: bool) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str, token_ids: List[int], finish: Optional[str], role: bool = False) -> str:
            if chat:
                delta: Dict[str, Any] = {"role": "assistant", "content": piece} if role else \
                    ({"content": piece} if piece or finish is None else {})
                choice: Dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None}
            choice.update(finish_reason=finish, token_ids=token_ids)
            payload = {"id": request_id, "object": kind, "created": created, "model": service.name,
                       "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        generated = 0
        try:
            if chat:
                yield chunk("", [], None, role=True)
            delta = first
            while delta is not None:
                generated += len(delta.token_ids)
                piece = text.feed(delta.token_ids, final=delta.finish_reason is not None)
                finish = "stop" if text.stopped else delta.finish_reason
                yield chunk(piece, delta.token_ids, finish)
                if finish is not None:
                    break
                delta = await stream.__anext__()
            if body.include_usage():
                payload = {"id": request_id, "object": kind, "created": created, "model": service.name,
                           "choices": [], "usage": _usage(prompt_tokens, generated)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        except GenerationFailed as error:  # after the status line went out: the error is the stream's last event
            failure = _failure(error)
            yield f"data: {json.dumps(error_body(failure.message, kind=failure.kind, code=failure.code))}\n\n"
        finally:
            await stream.aclose()  # a client that went away: the engine cancels the request

    return app


def _version() -> str:
    from .. import __version__

    return __version__

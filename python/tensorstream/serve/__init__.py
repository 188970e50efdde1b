"""``tensorstream serve``: an OpenAI-compatible HTTP server that batches concurrent requests over streamed weights
(docs/serving.md). Needs the ``[serve]`` extra (FastAPI, uvicorn, prometheus-client) and ``[hf]`` (transformers).

* :mod:`.engine`: continuous batching (transformers' scheduler) with admission, typed errors, recovery, metrics.
* :mod:`.protocol`: the OpenAI request bodies we accept and the error shape.
* :mod:`.loader`: the model, tokenizer and name behind ``tensorstream serve MODEL``.
* :mod:`.app`: the routes.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..errors import ConfigError
from .loader import ServeOptions

__all__ = ["ServeOptions", "serve"]

logger = logging.getLogger("tensorstream.serve")


def _server_modules() -> Any:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise ConfigError(f"tensorstream serve needs FastAPI and uvicorn: pip install tensorstream[serve] ({error})",
                          field="serve") from None
    return uvicorn


def serve(options: ServeOptions, host: str = "0.0.0.0", port: int = 8000, log_level: str = "info",
          ready: Optional[Any] = None) -> None:
    """Runs the server until it is stopped (SIGINT / SIGTERM). The model loads on a thread once the socket
    listens; ``/health`` says 503 with the reason until it serves."""
    uvicorn = _server_modules()
    from .app import Service, create_app

    # transformers' batching logs every cache (re)initialisation at INFO under its own logger name
    logging.getLogger("ContinuousBatchingLogger").setLevel(max(logging.WARNING, logging.getLogger().level))
    service = Service(options)
    app = create_app(service)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    service.start_loading()
    try:
        server.run()
    finally:
        service.close()

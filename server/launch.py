"""Start the server: build the engine, its Prometheus logger, the AsyncEngine and the app, then run uvicorn.

The engine runs in a process of its own (EngineProcess), so the HTTP work here never holds up its steps;
`--no-engine-process` runs it in a thread of this process instead (simpler to debug, slower under load).

SIGTERM (or Ctrl+C) drains: the server stops taking requests, every request in flight ends with
finish_reason "abort" (a stream gets its last chunk and `data: [DONE]`), and the process exits 0 once the
responses are out, within `shutdown_timeout` seconds.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

import uvicorn

from miniengine import AsyncEngine, Engine
from miniengine.engine_process import EngineProcess, settle_gc
from miniengine.server.app import build_app, served_model_name
from miniengine.server.config import ServerConfig
from miniengine.server.metrics import PrometheusStatLogger

logger = logging.getLogger("miniengine.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, model: str) -> None:
        super().__init__(config)
        self.async_engine, self.model = async_engine, model

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"miniengine: serving {self.model} at http://{host}:{port}/v1", flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.async_engine.drain()  # before uvicorn waits for the responses in flight: they end now, with "abort"
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # uvicorn would raise the signal again once it has shut down, ending the process with 128 + 15;
        # a server that drained cleanly exits 0. A second Ctrl+C still forces the exit.
        self.force_exit = self.should_exit
        self.should_exit = True


def serve(model: str | None, config: ServerConfig, engine_options: dict[str, Any]) -> int:
    """Run `miniengine serve` until SIGTERM / Ctrl+C; returns the exit status."""
    # The thread that receives the engine's outputs (or, with --no-engine-process, the engine loop itself)
    # shares the GIL with the HTTP loop. Each time it wakes it waits for the GIL until the HTTP thread yields
    # it, at most the switch interval (5 ms by default, as long as a small model's whole step on a GPU): a
    # shorter interval hands it over sooner.
    sys.setswitchinterval(0.0005)
    if config.engine_process:
        engine: Engine | EngineProcess = EngineProcess(model, **engine_options)
    else:
        engine = Engine(model, **engine_options)
    name = config.served_model_name or served_model_name(engine.model_path)
    metrics = PrometheusStatLogger(name)
    engine.stat_loggers.append(metrics)
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, config, metrics, name)
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        access_log=False,  # the Gate logs one line per request, with its tokens
        timeout_graceful_shutdown=config.shutdown_timeout,
        log_level="info",
    )
    server = _Server(uvicorn_config, async_engine, name)
    settle_gc()
    try:
        server.run()
    finally:
        async_engine.shutdown()
        engine.shutdown()  # the engine process, or the tensor parallel workers, if any
    return 0 if server.started else 1

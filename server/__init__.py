"""miniengine's OpenAI-compatible HTTP server (`miniengine serve`), a program over the public API.

    HTTP client ── uvicorn ── Gate (API key, body cap, log line) ── FastAPI routes (app.py)
                                                                      │  protocol.py: the request bodies
                                                                      ▼
                               completions.py: Job = token ids + SamplingParams, checked against limits
                                                                      │  AsyncEngine.add_request per prompt
                                                                      ▼
    engine process: Engine.step_deltas() ── StepDelta ─────> OutputProcessor (text, stop strings) ──> RequestOutputs
                         │                                   ──> each request's stream ──> JSON or SSE
                         └── StepStats ──────────────────> metrics.py (Prometheus, GET /metrics)

The engine loop runs in a process of its own (EngineProcess), or with --no-engine-process in a thread of
this one. Nothing here reaches into the engine's internals: any asyncio program could do the same.

The names below are imported on first use: `miniengine generate` reads `ServerConfig`'s flags for its
parser and should not pay for FastAPI and uvicorn (about 0.3 s of a cold start).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"ServerConfig": "config", "build_app": "app", "serve": "launch"}
__all__ = ["ServerConfig", "build_app", "serve"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)

"""miniengine's OpenAI-compatible HTTP server (`miniengine serve`), a program over the public API.

    HTTP client ── uvicorn ── Gate (API key, body cap, log line) ── FastAPI routes (app.py)
                                                                      │  protocol.py: the request bodies
                                                                      ▼
                               completions.py: Job = token ids + SamplingParams, checked against limits
                                                                      │  AsyncEngine.add_request per prompt
                                                                      ▼
    engine process: Engine.step() ── output deltas ──> RequestOutputs ──> each request's stream ──> JSON or SSE
                         └── StepStats ──────────────────> metrics.py (Prometheus, GET /metrics)

The engine loop runs in a process of its own (EngineProcess), or with --no-engine-process in a thread of
this one. Nothing here reaches into the engine's internals: any asyncio program could do the same.
"""

from miniengine.server.app import build_app
from miniengine.server.config import ServerConfig
from miniengine.server.launch import serve

__all__ = ["ServerConfig", "build_app", "serve"]

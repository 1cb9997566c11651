"""What `miniengine serve` adds to the engine's own settings: where to listen, who may call, and the
limits that keep one client from taking the whole server (each refused with a 4xx/503 that says which)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port (the ready line says which)
    api_key: str | None = None  # if set, /v1/*, /tokenize and /detokenize need "Authorization: Bearer KEY"
    served_model_name: str | None = None  # None: the model file's or directory's name
    max_n: int = 16  # samples per prompt
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_completion_tokens: int | None = None  # tokens one completion may ask for; None: up to the context
    max_body_bytes: int = 4 * 2**20  # larger request bodies are refused (413) before they are read whole
    max_waiting_requests: int = 1024  # past this many queued requests, new ones get 503 + Retry-After
    shutdown_timeout: float = 5.0  # seconds SIGTERM waits for in-flight responses to end
    engine_process: bool = True  # the engine loop in its own process; False: in a thread of the server's

    def __post_init__(self) -> None:
        for name in ("max_n", "max_prompts", "max_body_bytes", "max_waiting_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise ValueError(f"max_completion_tokens={self.max_completion_tokens} must be at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be in [0, 65535]")

"""What happens to a request before FastAPI parses it, and after its response ends.

    client -> Gate: API key (constant-time compare), body size cap -> FastAPI route -> response -> Gate: log line

Both checks run before the body is read whole: a wrong key is refused before any byte of the body is
read, and a body is refused (413) as soon as its declared or received length passes the cap. Every
request then ends in one log line: method, path, status, latency, and for a completion the request id,
its tokens in and out and how it finished.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from miniengine.server.config import ServerConfig
from miniengine.server.errors import APIError

logger = logging.getLogger("miniengine.server")

OPEN_PATHS = ("/health", "/metrics", "/version", "/docs", "/openapi.json")  # never need the API key


class Gate:
    def __init__(self, app, config: ServerConfig) -> None:  # noqa: ANN001 (any ASGI app)
        self.app = app
        self.config = config
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]
        state = scope.setdefault("state", {})

        async def send_and_log(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                job = state.get("job")
                logger.info(
                    "%s %s %d %.3fs%s", scope["method"], scope["path"], status[0], time.monotonic() - start,
                    f" {job.summary()}" if job is not None else "",
                )  # fmt: skip

        refusal = self._check_key(scope)
        body = None
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read_body(scope, receive)
        if refusal is not None:
            return await _send_error(refusal, send_and_log)
        if body is None:
            return await self.app(scope, receive, send_and_log)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send_and_log)

    def _check_key(self, scope: dict) -> APIError | None:
        if self._key is None or scope["path"].startswith(OPEN_PATHS):
            return None
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest takes as long whatever the first differing byte: the key cannot be guessed by timing.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._key):
            return APIError(401, "a missing or wrong API key: send the header 'Authorization: Bearer KEY'")
        return None

    async def _read_body(self, scope: dict, receive) -> tuple[bytes | None, APIError | None]:  # noqa: ANN001
        cap = self.config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {cap:,} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return None, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None  # the client left; the app sees an empty body and nobody reads the answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return None, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


async def _send_error(error: APIError, send) -> None:  # noqa: ANN001
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})

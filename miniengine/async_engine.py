"""AsyncEngine: the engine loop in a background thread; each request is an asyncio stream of its outputs.

    asyncio tasks (any number)                         the engine thread (the only one that touches the Engine)
    await add_request(prompt) -- add --> commands -->  Engine.add_request / abort
    async for out in stream  <-- the request's own      Engine.step() -> [RequestOutput, ...]
                                 queue <--------------  each output routed by request id

Callers never wait on a step: `add` and `abort` are commands the engine thread runs between steps, so a
request joins the very next batch. Each output goes to the stream of the request it names, and only
there. An output is the request's whole state so far, so a consumer that falls behind simply receives
the newest one. A consumer that stops listening (its task cancelled, a client gone) aborts its request,
and its KV blocks return to the pool. If a step raises, the loop is dead: every stream gets the error,
and `error` says why (a server's /health turns 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from miniengine.engine import Engine, Prompt
from miniengine.outputs import RequestOutput
from miniengine.sampling_params import SamplingParams

logger = logging.getLogger("miniengine")


class EngineStoppedError(RuntimeError):
    """The engine loop takes no more requests: it was shut down, is draining, or died (see `error`)."""


@dataclass(eq=False)
class RequestStream:
    """One request's outputs as they come (`async for out in stream`); `close()` aborts it if it still runs."""

    _owner: AsyncEngine
    _loop: asyncio.AbstractEventLoop
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: str | None = None  # set by the engine thread once the engine took the request
    finished: bool = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty():  # fell behind: the newest output says it all
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner._submit(lambda: self._owner._abort_stream(self), quiet=True)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        """Start the loop over `engine`; from now on only the loop's thread may call the engine."""
        self.engine = engine
        self.error: BaseException | None = None  # why the loop died, if it did
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "refuse new requests" against "queue a command"
        self._refusing: str | None = None  # why new requests are refused
        self._pending: set[concurrent.futures.Future[str]] = set()  # adds queued, not yet run
        self._num_waiting = 0
        self._device = engine.platform.device()  # the current device is per thread: the loop takes this one
        self._thread = threading.Thread(target=self._run, name="miniengine-loop", daemon=True)
        self._thread.start()

    # ---- the asyncio side ----------------------------------------------------------------------------------

    async def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request once the engine took it; bad input raises here, as `Engine.add_request` would.

        Raises `EngineStoppedError` if the loop takes no more requests. Close the stream if you stop
        reading it before its last output: that aborts the request.
        """
        stream = RequestStream(self, asyncio.get_running_loop())
        added: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._submit(lambda: self._add(stream, prompt, params, request_id, added), added=added)
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until the last (finished) one; leaving early aborts it."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream receives a last output with finish_reason "abort"."""
        self._submit(lambda: self.engine.abort(request_id), quiet=True)

    def drain(self) -> None:
        """Refuse new requests and abort the running ones (their streams end with "abort"): for shutdown."""
        self._refuse("the engine is shutting down")
        self._submit(lambda: [self.engine.abort(r) for r in list(self._streams)], quiet=True, force=True)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Drain, then stop the loop's thread."""
        self.drain()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests not yet given a place in the running batch (queued here, or waiting in the scheduler)."""
        return len(self._pending) + self._num_waiting

    def _submit(
        self,
        command: Callable[[], None],
        added: concurrent.futures.Future[str] | None = None,
        quiet: bool = False,
        force: bool = False,
    ) -> None:
        with self._lock:
            if self._refusing is not None and not force:
                if quiet:
                    return
                raise EngineStoppedError(self._refusing)
            if added is not None:
                self._pending.add(added)
            self._commands.put(command)

    def _refuse(self, reason: str) -> None:
        with self._lock:
            self._refusing = self._refusing or reason

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._device.index is not None:
                self.engine.platform.set_device(self._device.index)
            while self._run_commands(block=not self.engine.has_unfinished()):
                self._count_waiting()
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                self._count_waiting()
            self._deliver(self.engine.step())  # the aborted requests' last outputs
            self._end_streams(EngineStoppedError("the engine was shut down"))
        except BaseException as error:
            logger.exception("the engine loop died")
            self.error = error
            self._end_streams(EngineStoppedError(f"the engine loop died: {type(error).__name__}: {error}"))

    def _count_waiting(self) -> None:
        self._num_waiting = len({s.request_id for s in self.engine.scheduler.waiting})

    def _run_commands(self, block: bool) -> bool:
        """Run every queued command (waiting for one if `block`); False once told to stop."""
        try:
            command = self._commands.get(block=block)
            while command is not None:
                command()
                command = self._commands.get_nowait()
            return False
        except queue.Empty:
            return True

    def _add(
        self,
        stream: RequestStream,
        prompt: Prompt,
        params: SamplingParams | None,
        request_id: str | None,
        added: concurrent.futures.Future[str],
    ) -> None:
        with self._lock:
            self._pending.discard(added)
        if not added.set_running_or_notify_cancel():
            return  # the caller gave up before its request was added
        try:
            stream.request_id = self.engine.add_request(prompt, params, request_id)
        except Exception as error:  # bad input: the caller's own error, raised where it awaits
            added.set_exception(error)
            return
        self._streams[stream.request_id] = stream
        added.set_result(stream.request_id)

    def _abort_stream(self, stream: RequestStream) -> None:
        # By identity: the caller's request_id may have been refused as a duplicate of someone else's.
        if stream.request_id is not None and self._streams.get(stream.request_id) is stream:
            self.engine.abort(stream.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # every request here came through `generate`; this one's stream was ended
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream._loop, []).append((stream, out))
        self._post(by_loop)

    def _end_streams(self, error: EngineStoppedError) -> None:
        """The loop ends: every open stream, and every add still queued (never to run), gets `error`."""
        self._refuse(str(error))
        with self._lock:
            pending, self._pending = self._pending, set()
        for added in pending:
            if added.set_running_or_notify_cancel():
                added.set_exception(error)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]] = {}
        for stream in self._streams.values():
            by_loop.setdefault(stream._loop, []).append((stream, error))
        self._streams.clear()
        self._post(by_loop)

    @staticmethod
    def _post(by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, object]]]) -> None:
        """Hand items to their streams: one wake-up per event loop per step, not one per output."""
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read these
                pass


def _put_all(items: list[tuple[RequestStream, object]]) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)

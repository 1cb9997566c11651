"""AsyncEngine: the engine loop in the background; each request is an asyncio stream of its outputs.

    asyncio tasks (any number)                              the engine loop (engine_loop.py), either
    await add_request(prompt) --> Add  --> commands -->     in a thread here:  AsyncEngine(Engine(...))
    stream.close()            --> AbortStream(key)          or in its own process:  AsyncEngine(EngineProcess(...))
    async for out in stream   <-- the request's own   <--   reports: adds taken, each step's outputs
                                  queue                     (routed by request id by the reporting thread)

Callers never wait on a step: commands run between steps, so a request joins the very next batch. The
thread shares this process's GIL with whatever else runs here (a busy HTTP server starves it); the
engine process does not, and sends each step's new token ids only, which its receiver thread here turns
into the same `RequestOutput`s (text, stop strings: output_processor.py). Each output goes to the stream
of the request it names, and only there. An output is the request's whole state so far, so a consumer
that falls behind simply receives the newest one. A consumer that stops listening (its task cancelled, a
client gone) aborts its request, and its KV blocks return to the pool. If the loop dies (a step raised,
the engine process was killed), every stream gets the error, and `error` says why (/health turns 503).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from miniengine.engine import Engine, Prompt
from miniengine.engine_loop import Abort, AbortStream, Add, Command, Drain, EngineLoop, Report, Stop
from miniengine.outputs import RequestOutput
from miniengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from miniengine.engine_process import EngineProcess

logger = logging.getLogger("miniengine")


class EngineStoppedError(RuntimeError):
    """The engine loop takes no more requests: it was shut down, is draining, or died (see `error`)."""


@dataclass(eq=False)
class RequestStream:
    """One request's outputs as they come (`async for out in stream`); `close()` aborts it if it still runs."""

    _owner: AsyncEngine
    _loop: asyncio.AbstractEventLoop
    key: int  # names this stream to the engine loop
    request_id: str | None = None  # set once the engine took the request
    finished: bool = False
    # The newest output not yet read (or the error that ends the stream): a consumer that fell behind gets only
    # this one, which says it all. One slot and one future, not a queue: the cheapest hand-over per output.
    _latest: RequestOutput | BaseException | None = None
    _waiter: asyncio.Future | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._latest is None:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert item is not None  # the waiter is woken only once an item is in place
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner._submit(AbortStream(self.key), quiet=True)

    def _put(self, item: RequestOutput | BaseException) -> None:
        """On the stream's event loop: `item` replaces any output not yet read, and wakes the reader."""
        self._latest = item
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_Items = list[tuple[RequestStream, RequestOutput | BaseException]]  # what one wake-up hands to one event loop


class _Thread:
    """The loop in a thread of this process, over an Engine the caller built."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._device = engine.platform.device()  # the current device is per thread: the loop takes this one

    def send(self, command: Command) -> None:
        self.commands.put(command)

    def run(self, report: Callable[[Report], None]) -> None:
        if self._device.index is not None:
            self.engine.platform.set_device(self._device.index)
        EngineLoop(self.engine).run(self._receive, report)

    def _receive(self, block: bool) -> list[Command]:
        commands = []
        try:
            commands.append(self.commands.get(block=block))
            while True:
                commands.append(self.commands.get_nowait())
        except queue.Empty:
            return commands

    def close(self, timeout: float) -> None:
        pass


class AsyncEngine:
    def __init__(self, engine: Engine | EngineProcess) -> None:
        """Start the loop over `engine`: an Engine built here (the loop runs in a thread, and from now on only
        that thread may call the engine), or an EngineProcess (the loop runs in that process)."""
        self.engine = engine
        self._backend = _Thread(engine) if isinstance(engine, Engine) else engine
        self.error: BaseException | None = None  # why the loop died, if it did
        self._streams: dict[str, RequestStream] = {}  # request id -> stream; the reporting thread's own
        self._lock = threading.Lock()  # orders "refuse new requests" against "send a command"
        self._refusing: str | None = None  # why new requests are refused
        self._adding: dict[int, tuple[RequestStream, concurrent.futures.Future[str]]] = {}  # sent, not yet taken
        self._keys = itertools.count()
        self._num_waiting = 0
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
        stream = RequestStream(self, asyncio.get_running_loop(), next(self._keys))
        added: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._submit(Add(stream.key, prompt, params, request_id), adding=(stream, added))
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
        self._submit(Abort(request_id), quiet=True)

    def drain(self) -> None:
        """Refuse new requests and abort the running ones (their streams end with "abort"): for shutdown."""
        self._refuse("the engine is shutting down")
        self._submit(Drain(), quiet=True, force=True)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Drain, then stop the loop (and the engine process, if it runs in one)."""
        self.drain()
        self._submit(Stop(), quiet=True, force=True)
        self._thread.join(timeout)
        self._backend.close(timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests not yet given a place in the running batch (sent to the loop, or waiting in the scheduler)."""
        return len(self._adding) + self._num_waiting

    def _submit(
        self,
        command: Command,
        adding: tuple[RequestStream, concurrent.futures.Future[str]] | None = None,
        quiet: bool = False,
        force: bool = False,
    ) -> None:
        with self._lock:
            if self._refusing is not None and not force:
                if quiet:
                    return
                raise EngineStoppedError(self._refusing)
            if adding is not None:
                self._adding[adding[0].key] = adding
            self._backend.send(command)

    def _refuse(self, reason: str) -> None:
        with self._lock:
            self._refusing = self._refusing or reason

    # ---- the reporting thread (the engine thread itself, or the engine process's receiver) ------------------

    def _run(self) -> None:
        try:
            self._backend.run(self._report)
            self._end_streams(EngineStoppedError("the engine was shut down"))
        except BaseException as error:
            logger.error("the engine loop died: %s: %s", type(error).__name__, error, exc_info=error)
            self.error = error
            self._end_streams(EngineStoppedError(f"the engine loop died: {type(error).__name__}: {error}"))

    def _report(self, report: Report) -> None:
        for key, result in report.added:
            with self._lock:
                stream, added = self._adding.pop(key)
            if not added.set_running_or_notify_cancel():
                continue  # the caller gave up: its stream's close() aborts the request
            if isinstance(result, Exception):
                added.set_exception(result)
            else:
                stream.request_id = result
                self._streams[result] = stream
                added.set_result(result)
        # After the adds leave `_adding`: counted in both at once, a request would look like two to an
        # overload check in between (a spurious 503).
        self._num_waiting = report.num_waiting
        by_loop: dict[asyncio.AbstractEventLoop, _Items] = {}
        for out in report.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # its caller gave up before its add was taken: nobody reads this
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream._loop, []).append((stream, out))
        self._post(by_loop)

    def _end_streams(self, error: EngineStoppedError) -> None:
        """The loop ends: every open stream, and every add still unanswered (never to be), gets `error`."""
        self._refuse(str(error))
        with self._lock:
            adding, self._adding = self._adding, {}
        for _, added in adding.values():
            if added.set_running_or_notify_cancel():
                added.set_exception(error)
        by_loop: dict[asyncio.AbstractEventLoop, _Items] = {}
        for stream in self._streams.values():
            by_loop.setdefault(stream._loop, []).append((stream, error))
        self._streams.clear()
        self._post(by_loop)

    @staticmethod
    def _post(by_loop: dict[asyncio.AbstractEventLoop, _Items]) -> None:
        """Hand items to their streams: one wake-up per event loop per step, not one per output."""
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read these
                pass


def _put_all(items: _Items) -> None:
    for stream, item in items:
        stream._put(item)

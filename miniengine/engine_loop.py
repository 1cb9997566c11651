"""The engine loop: what runs an Engine behind an AsyncEngine, in a thread of the caller's process or in a
process of its own (engine_process.py). Either way it is this loop:

    commands, in the order sent            the loop                                 reports
    Add(key, prompt, params, request_id)   1. run every command that arrived   -->  Report(added=[(key, id or error)])
    Abort(request_id) / AbortStream(key)      (wait for one while nothing runs)
    Finish(request_id, index)              2. step once, if any request runs   -->  Report(outputs, num_waiting)
    Drain() / Stop()

A key names one caller's stream. Aborting by key reaches the request that stream added and never a later
one that reuses its request id; an abort that arrives before its add has run still finds it, because
commands run in order. `Drain` aborts every request; `Stop` ends the loop after one last step, which
reports the aborted requests' final outputs.

In a thread (`EngineLoop(engine)`) a step reports `RequestOutput`s (`Engine.step`). In an engine process
(`deltas=True`) it reports the engine's `StepDelta` (`Engine.step_deltas`): the front end turns it into
text and outputs (output_processor.py), and sends `Finish` for each sample a stop string ended.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from miniengine.engine import Engine, Prompt
from miniengine.output_processor import StepDelta
from miniengine.outputs import RequestOutput
from miniengine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Add:
    key: int
    prompt: Prompt
    params: SamplingParams | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class AbortStream:
    key: int


@dataclass(frozen=True, slots=True)
class Finish:
    """A stop string ended this sample (found by the front end's output processor)."""

    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = Add | Abort | AbortStream | Finish | Drain | Stop


@dataclass(slots=True)
class Report:
    added: list[tuple[int, str | Exception]] = field(default_factory=list)  # key -> request id, or why not
    outputs: list[RequestOutput] | StepDelta = field(default_factory=list)  # StepDelta: an engine process's
    num_waiting: int = 0  # requests waiting in the scheduler for a place in the batch


class EngineLoop:
    def __init__(self, engine: Engine, deltas: bool = False) -> None:
        self.engine = engine
        self.deltas = deltas
        self._ids: dict[int, str] = {}  # key -> request id, while the request runs
        # A Finish ended a request: the next step runs even if nothing else does, so that the stat loggers
        # hear of it (and of its freed blocks) now, not with the next request.
        self._retired = False

    def run(self, receive: Callable[[bool], list[Command]], report: Callable[[Report], None]) -> None:
        """Loop until `Stop`. `receive(block)` returns the commands that arrived (with `block`, at least one)."""
        engine = self.engine
        while True:
            added, stop = self._run(receive(not engine.has_unfinished()))
            if added:  # at once: a caller learns of bad input before the step
                report(Report(added, [], self._num_waiting()))
            if stop:
                break
            if engine.has_unfinished() or self._retired:
                self._retired = False
                report(Report([], self._step(), self._num_waiting()))
        report(Report([], self._step(), self._num_waiting()))

    def _run(self, commands: list[Command]) -> tuple[list[tuple[int, str | Exception]], bool]:
        added: list[tuple[int, str | Exception]] = []
        for command in commands:
            if isinstance(command, Add):
                try:
                    request_id = self.engine.add_request(command.prompt, command.params, command.request_id)
                except Exception as error:  # bad input: the caller's own error, raised where it awaits
                    added.append((command.key, error))
                    continue
                self._ids[command.key] = request_id
                added.append((command.key, request_id))
            elif isinstance(command, Abort):
                self.engine.abort(command.request_id)
            elif isinstance(command, AbortStream):
                if command.key in self._ids:
                    self.engine.abort(self._ids[command.key])
            elif isinstance(command, Finish):
                if self.engine.finish_sample(command.request_id, command.index):
                    self._forget(command.request_id)
                    self._retired = True
            elif isinstance(command, Drain):
                for request_id in self._ids.values():
                    self.engine.abort(request_id)
            else:
                return added, True
        return added, False

    def _step(self) -> list[RequestOutput] | StepDelta:
        if self.deltas:
            delta = self.engine.step_deltas()
            self._forget(*delta.retired)
            return delta
        outputs = self.engine.step()
        self._forget(*(out.request_id for out in outputs if out.finished))
        return outputs

    def _forget(self, *done: str) -> None:
        """These requests finished: a later request may take their ids, and no old key may abort it."""
        if done:
            self._ids = {key: rid for key, rid in self._ids.items() if rid not in done}

    def _num_waiting(self) -> int:
        return len({seq.request_id for seq in self.engine.scheduler.waiting})

"""The engine loop: what runs an Engine behind an AsyncEngine, in a thread of the caller's process or in a
process of its own (engine_process.py). Either way it is this loop:

    commands, in the order sent            the loop                                 reports
    Add(key, prompt, params, request_id)   1. run every command that arrived   -->  Report(added=[(key, id or error)])
    Abort(request_id) / AbortStream(key)      (wait for one while nothing runs)
    Drain() / Stop()                       2. step once, if any request runs   -->  Report(outputs, num_waiting)

A key names one caller's stream. Aborting by key reaches the request that stream added and never a later
one that reuses its request id; an abort that arrives before its add has run still finds it, because
commands run in order. `Drain` aborts every request; `Stop` ends the loop after one last step, which
reports the aborted requests' final outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from miniengine.engine import Engine, Prompt
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
class Drain:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = Add | Abort | AbortStream | Drain | Stop


@dataclass(slots=True)
class Report:
    added: list[tuple[int, str | Exception]] = field(default_factory=list)  # key -> request id, or why not
    outputs: list[RequestOutput] = field(default_factory=list)
    num_waiting: int = 0  # requests waiting in the scheduler for a place in the batch


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids: dict[int, str] = {}  # key -> request id, while the request runs

    def run(self, receive: Callable[[bool], list[Command]], report: Callable[[Report], None]) -> None:
        """Loop until `Stop`. `receive(block)` returns the commands that arrived (with `block`, at least one)."""
        engine = self.engine
        while True:
            added, stop = self._run(receive(not engine.has_unfinished()))
            if added:  # at once: a caller learns of bad input before the step
                report(Report(added, [], self._num_waiting()))
            if stop:
                break
            if engine.has_unfinished():
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
            elif isinstance(command, Drain):
                for request_id in self._ids.values():
                    self.engine.abort(request_id)
            else:
                return added, True
        return added, False

    def _step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        if any(out.finished for out in outputs):
            done = {out.request_id for out in outputs if out.finished}
            self._ids = {key: rid for key, rid in self._ids.items() if rid not in done}
        return outputs

    def _num_waiting(self) -> int:
        return len({seq.request_id for seq in self.engine.scheduler.waiting})

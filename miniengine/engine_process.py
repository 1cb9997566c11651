"""EngineProcess: an Engine in a spawned process of its own, so that its loop never waits for this process's GIL.

    this process (the front end: an HTTP server)              the engine process (spawned, never forked)
    EngineProcess(model, **options)                           load general plugins, register the front end's
      open the checkpoint: tokenizer, chat template, config    own models, build Engine(model, **options)
      spawn ------------------------------------------------> ("ready", max_model_len)
    AsyncEngine(engine_process)
      commands -> sender thread ---- [Add, Abort, ...] ---->  EngineLoop (engine_loop.py): run the commands,
      streams  <- receiver thread <-- one message a step ---  step, and write the step's report: adds taken,
                 OutputProcessor -> RequestOutputs              the StepDelta (to_wire), waiting count, the
                   (stop string found: Finish(id, index) -->)   step's StepStats
                 stat_loggers.record(StepStats)

One message per step, whatever the batch, carrying the step's `StepDelta` (`Engine.step_deltas`): its rows
(sequence id, token id) as two arrays' raw bytes, and the rare news (requests started or finished, logprobs)
only when there is some, so the engine process does no string work and builds no object per token
(`to_wire`, `from_wire`). Detokenizing, stop strings and building `RequestOutput`s
happen here, in the receiver thread (output_processor.py); a stop string found here goes back as a `Finish`
command, which frees the sample's blocks (the engine may have sampled a token or two past it meanwhile:
they are dropped here, though the step statistics count them as generated). The caller's stat loggers (the
server's Prometheus metrics) run here on the StepStats each message carries; stat-logger plugins run in the
engine process, beside the loop.

Start-up follows the tensor parallel workers (distributed.py): a model class registered only in this
process's memory is sent as "module:Class" (or refused with DriverOnlyModelError if no other process can
import it), and an error while building the engine is raised here, as its own type where it can be
pickled, with the engine process's traceback attached.

Faults and shutdown: the engine process ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process
group; the front end drains and stops it) and exits when told to stop, or when this process is gone (its
command pipe closes). If it dies, the receiver thread raises `EngineProcessError` (with the traceback it sent,
if it could): the AsyncEngine ends every stream with that error and turns unhealthy.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
import weakref
from array import array
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from miniengine.config import EngineConfig
from miniengine.engine_loop import Command, EngineLoop, Finish, Report, Stop
from miniengine.loader import open_checkpoint
from miniengine.output_processor import OutputProcessor, StepDelta
from miniengine.stats import LoggingStatLogger, StatLogger, StepStats


class EngineProcessError(RuntimeError):
    """The engine process died; the message carries its traceback where it could send one."""


class EngineProcess:
    """An Engine running in its own process, to hand to `AsyncEngine`; what a front end reads of the engine
    (tokenizer and chat template, model config, max_model_len) is here, in this process."""

    def __init__(self, model: str | None = None, *, stat_loggers: list[StatLogger] | None = None, **options: Any):
        """Start an engine process with `Engine(model, **options)` and wait until it is ready; `stat_loggers`
        run here, on each step's StepStats (default: one log line every few seconds)."""
        config = EngineConfig(model=model, **options)  # bad options fail here, before anything is spawned
        checkpoint = open_checkpoint(config.model)
        self.model_path, self.hf_config, self.tokenizer = checkpoint.path, checkpoint.config, checkpoint.tokenizer
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else set()
        self.stat_loggers: list[StatLogger] = [LoggingStatLogger()] if stat_loggers is None else list(stat_loggers)
        from miniengine.distributed import models_for_workers  # torch.distributed: only when it is needed

        models = models_for_workers(checkpoint.config, "the engine process")
        context = mp.get_context("spawn")  # never fork: CUDA cannot be re-initialised in a forked child
        commands, self._commands_in = context.Pipe(duplex=False)
        self._reports, reports_in = context.Pipe(duplex=False)
        _widen(self._reports)
        _widen(self._commands_in)
        level = logging.getLogger("miniengine").getEffectiveLevel()
        # Not a daemon: the engine process starts tensor parallel workers of its own.
        self.proc = context.Process(
            target=run_engine_process,
            args=(model, options, models, level, commands, reports_in),
            name="miniengine-engine",
        )
        self.proc.start()
        commands.close()
        reports_in.close()
        self._outbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._finalizer = weakref.finalize(self, _stop, self.proc, self._commands_in, self._reports)
        kind, *rest = self._receive()
        if kind != "ready":
            self.close(5.0)
            raise _error_from(self.proc, rest)
        self.max_model_len: int = rest[0]
        threading.Thread(target=self._send_commands, name="miniengine-commands", daemon=True).start()

    def chat_prompt(self, messages: list[dict]) -> dict:
        """As `Engine.chat_prompt`: the conversation under the model's chat template, as a prompt of token ids."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer: chat needs one")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    # ---- what AsyncEngine calls ----------------------------------------------------------------------------

    def send(self, command: Command) -> None:
        """Queue a command for the engine process (never blocks: the sender thread writes it)."""
        self._outbox.put(command)

    def run(self, report: Callable[[Report], None]) -> None:
        """Hand each step's report to `report` until the loop stops; raises EngineProcessError if it dies."""
        processor = OutputProcessor(self.tokenizer)
        while True:
            kind, *rest = self._receive()
            if kind != "step":
                raise _error_from(self.proc, rest)
            added, wire, num_waiting, stats, last = rest
            for step_stats in stats:
                for stat_logger in self.stat_loggers:
                    stat_logger.record(step_stats)
            outputs, stops = processor.process(from_wire(wire)) if wire is not None else ([], [])
            for request_id, index in stops:  # before the outputs go out: a caller may reuse the id at once
                self.send(Finish(request_id, index))
            report(Report(added, outputs, num_waiting))
            if last:
                return

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` seconds for the engine process to end (it was told to stop), then kill it."""
        self._outbox.put(None)
        self._finalizer.detach()
        _stop(self.proc, self._commands_in, self._reports, timeout)

    def shutdown(self) -> None:
        """Stop the engine process if it still runs (AsyncEngine.shutdown stops it politely first)."""
        if self.proc.is_alive():
            self._outbox.put(Stop())
        self.close(5.0)

    # ---- the pipes -----------------------------------------------------------------------------------------

    def _send_commands(self) -> None:
        """Forward queued commands, all that are waiting in one message, until `close`."""
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            commands = [c for c in batch if c is not None]
            try:
                if commands:
                    self._commands_in.send(commands)
            except (OSError, ValueError):  # the engine process is gone: the receiver reports why
                return
            if len(commands) < len(batch):
                return

    def _receive(self) -> tuple:
        """The next message from the engine process, or ("dead",) once it has exited without one."""
        while True:
            try:
                if self._reports.poll():
                    return self._reports.recv()
            except (EOFError, OSError):
                return ("dead",)
            if not self.proc.is_alive():
                return ("dead",)
            wait([self._reports, self.proc.sentinel])


def to_wire(delta: StepDelta) -> tuple:
    """A StepDelta as plain values for pickle: the rows as their arrays' raw bytes (one copy each, where
    pickling a list would write every int), the rare parts as they are (empty, most steps)."""
    return (
        delta.seq_ids.tobytes(), delta.token_ids.tobytes(), delta.started, delta.finished, delta.logprobs,
        delta.retired,
    )  # fmt: skip


def from_wire(wire: tuple) -> StepDelta:
    seq_id_bytes, token_id_bytes, started, finished, logprobs, retired = wire
    seq_ids, token_ids = array("q"), array("i")
    seq_ids.frombytes(seq_id_bytes)
    token_ids.frombytes(token_id_bytes)
    return StepDelta(seq_ids, token_ids, started, finished, logprobs, retired)


def settle_gc() -> None:
    """For a process whose start-up is over and whose loop now makes and drops small objects by the thousand
    each step (outputs, deltas, events): what start-up built (modules, the model, the app: some 200,000
    objects) is moved out of the collector's sight, and young objects are collected less often. Every
    collection of the older generations walked all of those objects: without this, the collector took two
    thirds of the time spent encoding and decoding each step's outputs."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _error_from(proc: mp.Process, rest: list) -> BaseException:
    """The engine process's own error (its traceback attached), or why it ended without one."""
    if rest:
        error, text = rest
        error.add_note(f"in the engine process (pid {proc.pid}):\n{text}")
        return error
    proc.join(1)
    code = proc.exitcode
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return EngineProcessError(f"the engine process (pid {proc.pid}) died ({how}) and sent no error")


def _widen(pipe: Connection) -> None:
    """Room for many steps' messages (Linux; 64 KiB otherwise): a front end that is late to read them, busy
    with its HTTP clients for a moment, must not hold up the engine process's next step."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 2**20)
    except (ImportError, AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size
        pass


def _stop(proc: mp.Process, commands: Connection, reports: Connection, timeout: float = 0.0) -> None:
    commands.close()  # the engine process sees its pipe close and leaves
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    reports.close()


# ---- the engine process ------------------------------------------------------------------------------------


class _Forward:
    """A stat logger that keeps each step's StepStats for the next message to the front end."""

    def __init__(self) -> None:
        self.stats: list[StepStats] = []

    def record(self, stats: StepStats) -> None:
        self.stats.append(stats)


def run_engine_process(
    model: str | None,
    options: dict[str, Any],
    models: dict[str, str],
    log_level: int,
    commands: Connection,
    reports: Connection,
) -> None:
    """The engine process's life: build the engine, say "ready", run the loop until Stop (or until the front
    end is gone). Any error: its traceback to stderr and up the pipe, then exit 1."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from miniengine.cli import LOG_FORMAT

    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        from miniengine.engine import Engine
        from miniengine.plugins import load_general_plugins
        from miniengine.registry import ModelRegistry

        load_general_plugins()  # MINIENGINE_PLUGINS, inherited from the front end, applies here too
        for arch, target in models.items():
            if ModelRegistry.registered(arch) is None:
                ModelRegistry.register_model(arch, target)
        forward = _Forward()
        engine = Engine(model, stat_loggers=[forward], **options)
        settle_gc()
        reports.send(("ready", engine.max_model_len))

        def receive(block: bool) -> list[Command]:
            received: list[Command] = []
            if block:
                commands.poll(None)
            while commands.poll():
                received += commands.recv()  # EOFError once the front end is gone: this process ends
            return received

        def report(step: Report, last: bool = False) -> None:
            stats, forward.stats = forward.stats, []
            _send(reports, step, stats, last)

        EngineLoop(engine, deltas=True).run(receive, report)
        report(Report(), last=True)
        engine.shutdown()
    except (EOFError, BrokenPipeError):
        os._exit(0)  # the front end is gone: nobody is left to serve
    except BaseException as error:
        _fail(reports, error)


def _send(reports: Connection, step: Report, stats: list[StepStats], last: bool) -> None:
    """Write one step's report, here in the loop: with the rows as raw bytes, pickling it costs less than
    handing it to a thread would."""
    added = [(key, _portable(result)) for key, result in step.added]
    wire = to_wire(step.outputs) if isinstance(step.outputs, StepDelta) else None
    message = pickle.dumps(("step", added, wire, step.num_waiting, stats, last), pickle.HIGHEST_PROTOCOL)
    try:
        reports.send_bytes(message)
    except OSError:
        os._exit(0)  # the front end is gone: nobody is left to serve


def _fail(reports: Connection, error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    print(f"miniengine engine process failed:\n{text}", file=sys.stderr, flush=True)
    try:
        reports.send(("error", _portable(error), text))
    except OSError:
        pass  # the front end is gone
    os._exit(1)


def _portable(result: Any) -> Any:
    """`result` as it can cross the pipe: a request id or an error that survives pickling as it is, any other
    error as a RuntimeError that names it."""
    if not isinstance(result, BaseException):
        return result
    try:
        pickle.loads(pickle.dumps(result))
    except Exception:
        return RuntimeError(f"{type(result).__name__}: {result}")
    return result

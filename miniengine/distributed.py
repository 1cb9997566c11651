"""Tensor parallel workers: one process per rank beyond the first, all running the same forward in lockstep.

    driver process = rank 0                        worker process = rank r (1..N-1), spawned (never forked)
    Engine: scheduler, block manager, sampler      load general plugins, resolve the platform, join the
    TensorParallelExecutor.run(batch):             process group, receive the engine config, load shard r
      step = prepare(batch)  ---- one message ---> (method, args) = broadcast from rank 0
      runner.execute(step)   <=== all-reduces ===> runner.execute(step)        (the same forward, its shard)
      logits  <-------------------- gather ------- its slice of the vocabulary
      sample, return the tokens

The message is `(ModelRunner method name, arguments)`, pickled and broadcast once per step over a gloo group
of its own (host memory: the step's numpy arrays never visit a GPU to be sent, and an idle server's workers
may wait for the next step as long as it takes). Each rank then calls that method of its own ModelRunner:
`execute` each step; `kv_blocks_that_fit` (then the minimum over ranks), `allocate_kv_cache` and
`capture_graphs` at start-up. The scheduler and block manager never leave the driver.

Faults: a worker that raises prints its traceback, sends it up its pipe and exits. A dead peer breaks the
next collective (gloo notices at once; under NCCL a watchdog thread aborts the group) and the driver raises
`WorkerError` with the worker's traceback; before each step it also checks that its workers live.
`shutdown` (and interpreter exit) stops every worker and closes the group and its port.

Several hosts: the same ranks over a TCP rendezvous. Host 0 runs the engine with `--nnodes M
--distributed-init-method tcp://HOST0:PORT`; host k runs `miniengine worker --node-rank k` with the same
flags and `--tensor-parallel-size`, which runs that host's ranks (`run_node`).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from miniengine.config import EngineConfig
from miniengine.extra_inputs import step_extra_inputs
from miniengine.loader import Checkpoint, load_model, open_checkpoint, resolve_dtype
from miniengine.model_runner import ModelRunner, StepInput, prepare
from miniengine.models.parallel import TensorParallel, check_divisible
from miniengine.platforms import Platform, resolve_platform
from miniengine.plugins import load_general_plugins
from miniengine.registry import ModelRegistry, UnsupportedArchitectureError
from miniengine.sampler import Sampler, SampleResult
from miniengine.scheduler import ScheduledBatch
from miniengine.sequence import Sequence

logger = logging.getLogger("miniengine")

# Collectives of the forward pass give up after this long (a hung peer); MINIENGINE_DIST_TIMEOUT overrides.
COLLECTIVE_TIMEOUT = timedelta(seconds=float(os.environ.get("MINIENGINE_DIST_TIMEOUT", 600)))
CONTROL_TIMEOUT = timedelta(days=365)  # how long a worker waits for the next step (an idle server sends none)
GRACE_S = 3.0  # after a broken collective, how long to wait for the worker that broke it to report


class WorkerError(RuntimeError):
    """A tensor parallel worker raised or died; the message carries its traceback where it could send one."""


class DriverOnlyModelError(UnsupportedArchitectureError):
    """The model class is registered in the driver in a way worker processes cannot import."""


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """Where one rank joins the group (picklable: a spawned worker's argument)."""

    init_method: str  # tcp://HOST:PORT (or env://)
    world_size: int
    rank: int
    local_rank: int  # the device index on its host
    device: str  # the platform to resolve ("auto")


def free_loopback_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def join_group(platform: Platform, where: Rendezvous) -> dist.ProcessGroup:
    """Join the default group on the platform's backend; returns the gloo group that carries the messages."""
    platform.set_device(where.local_rank)
    if platform.dist_backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast (NVLS) is off on the machines we run
    dist.init_process_group(
        platform.dist_backend,
        init_method=where.init_method,
        world_size=where.world_size,
        rank=where.rank,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def broadcast(message: Any, control: dist.ProcessGroup) -> Any:
    """Rank 0 sends `message`; every other rank returns it."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def min_over_ranks(value: int, control: dist.ProcessGroup) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=control)
    return int(tensor.item())


def models_for_workers(
    config: SimpleNamespace, workers: str = "the tensor parallel worker processes"
) -> dict[str, str]:
    """The driver's own registration of the checkpoint's architecture, as a lazy "module:Class" a worker can
    import (a model a general plugin registers is known to the workers already; built-ins always are). The
    engine process (engine_process.py) is such a worker too.

    A class defined in the driver's `__main__` (a user's script) cannot be imported by another process:
    that is an error, which says how to register the model so that every process has it."""
    for arch in getattr(config, "architectures", None) or []:
        target = ModelRegistry.registered(arch)
        if target is None:
            continue
        if isinstance(target, str):
            return {arch: target}
        module, name = target.__module__, target.__qualname__
        if module == "__main__" or "." in name or importlib.util.find_spec(module) is None:
            raise DriverOnlyModelError(
                f"architecture {arch!r} is registered in this process only, as class {name} of {module!r}, which "
                f"{workers} cannot import. Register it from a general plugin (an entry "
                "point in the group 'miniengine.general_plugins', run in every process: see "
                "examples/plugin_package), or register a lazy 'package.module:Class' of an importable module"
            )
        return {arch: f"{module}:{name}"}
    return {}


def _build_runner(config: EngineConfig, platform: Platform, tp: TensorParallel) -> ModelRunner:
    checkpoint = open_checkpoint(config.model)
    dtype = resolve_dtype(config.dtype, checkpoint.config, platform.default_dtype())
    model = load_model(checkpoint, platform.device(), dtype, config.load_format, config.seed, tp)
    return ModelRunner(model, platform, dtype, config)


def run_worker(where: Rendezvous, conn: Connection | None = None) -> None:
    """A worker's life: join, load its shard, then run each method rank 0 broadcasts until "shutdown".
    Any error: its traceback to stderr and up `conn`, then the process exits (which breaks the peers'
    collectives, so nobody waits on it)."""
    try:
        load_general_plugins()  # MINIENGINE_PLUGINS, inherited from the driver, applies here too
        platform = resolve_platform(where.device)
        if conn is not None:
            conn.send(("joining", None))
        control = join_group(platform, where)
        config, models = broadcast(None, control)
        for arch, target in models.items():
            if ModelRegistry.registered(arch) is None:
                ModelRegistry.register_model(arch, target)
        platform.check_and_update_config(config)
        tp = TensorParallel(where.rank, where.world_size, None, config.enable_expert_parallel)
        runner = _build_runner(config, platform, tp)
        dist.barrier(group=control)  # loaded
        while True:
            name, args = broadcast(None, control)
            if name == "shutdown":
                break
            result = getattr(runner, name)(*args)
            if name == "kv_blocks_that_fit":
                min_over_ranks(result, control)
        _leave_group([runner])
    except BaseException:
        text = traceback.format_exc()
        print(f"miniengine tensor parallel worker rank {where.rank} failed:\n{text}", file=sys.stderr, flush=True)
        if conn is not None:
            try:
                conn.send(("error", text))
            except OSError:
                pass  # the driver is gone
        os._exit(1)


def spawn_workers(first: int, count: int, where: Rendezvous) -> tuple[list[mp.Process], list[Connection]]:
    """Start ranks first .. first+count-1 on this host (local ranks 1..count), each with a pipe back."""
    context = mp.get_context("spawn")  # never fork: CUDA cannot be re-initialised in a forked child
    procs, conns = [], []
    for i in range(1, count + 1):
        receive, send = context.Pipe(duplex=False)
        rank = dataclasses.replace(where, rank=first + i, local_rank=i)
        proc = context.Process(target=run_worker, args=(rank, send), name=f"miniengine-tp-rank{first + i}")
        proc.daemon = True
        proc.start()
        send.close()
        procs.append(proc)
        conns.append(receive)
    return procs, conns


def _leave_group(runners: list[ModelRunner]) -> None:
    """Free the runners' CUDA graphs, then close the default process group. A graph that captured an NCCL
    collective holds a reference on its communicator, and destroying the group waits until every such graph
    is gone (pytorch/pytorch#115388): closing the group first hangs for ever."""
    for runner in runners:
        runner.shutdown()
    runners.clear()
    gc.collect()  # a graph in a reference cycle goes now, not at some later collection
    if dist.is_initialized():
        dist.destroy_process_group()


def _stop(procs: list[mp.Process], conns: list[Connection], runners: list[ModelRunner], wait_s: float = 0.0) -> None:
    """Wait up to `wait_s` for the workers to leave (they were told to), kill the rest, free this process's
    runners and leave the group; safe to call twice. (At interpreter exit nothing was said to the workers:
    they are killed at once.)"""
    deadline = time.monotonic() + wait_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()
    _leave_group(runners)  # closes the connections: a worker on another host leaves too


class TensorParallelExecutor:
    """Rank 0's ModelRunner plus the workers of the other ranks, behind the ModelRunner methods the engine
    calls (`run`, `execute`, `kv_blocks_that_fit`, `allocate_kv_cache`, `capture_graphs`, `shutdown`)."""

    def __init__(self, checkpoint: Checkpoint, platform: Platform, dtype: torch.dtype, config: EngineConfig) -> None:
        size, ep = config.tensor_parallel_size, config.enable_expert_parallel
        check_divisible(checkpoint.config, size, ep)
        if dist.is_initialized():
            raise RuntimeError(
                "this process already belongs to a torch.distributed group (another tensor parallel engine?): "
                "call its shutdown() first"
            )
        models = models_for_workers(checkpoint.config)
        where = Rendezvous(config.distributed_init_method or free_loopback_address(), size, 0, 0, config.device)
        if platform.dist_backend == "nccl":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before spawning: the workers inherit it
        self.config, self.platform, self._closed = config, platform, False
        self.procs, self.conns = spawn_workers(0, size // config.nnodes - 1, where)
        self._runners: list[ModelRunner] = []  # rank 0's, freed before the group closes
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, self._runners)
        self._errors: dict[int, str] = {}  # local worker index -> its traceback
        self._broken: BaseException | None = None  # a step that failed: the ranks are out of step since
        try:
            self._wait_until_joining()
            self.control = join_group(platform, where)
            broadcast((dataclasses.replace(config, model=checkpoint.path), models), self.control)
            tp = TensorParallel(0, size, None, ep)  # the layers use the default group: no reference kept
            self.model = load_model(checkpoint, platform.device(), dtype, config.load_format, config.seed, tp)
            self.runner = ModelRunner(self.model, platform, dtype, config)
            self._runners.append(self.runner)
            dist.barrier(group=self.control)  # every rank has its shard
        except BaseException as error:
            # A broken collective (RuntimeError) is a worker's fault, whose error says more; any other error
            # is the driver's own (the workers, loading the same checkpoint, likely meet it too).
            failure = self._worker_failure() if isinstance(error, RuntimeError) else None
            self._broken = error
            self.shutdown()
            if failure is not None:
                raise failure from error
            raise
        if platform.dist_backend != "gloo" and self.procs:
            threading.Thread(target=self._watchdog, name="miniengine-tp-watchdog", daemon=True).start()

    # ---- the ModelRunner methods the engine calls --------------------------------------------------------

    def run(self, batch: ScheduledBatch, sampler: Sampler) -> list[tuple[Sequence, SampleResult]]:
        step = prepare(batch, self.runner.block_size)
        logits = self.execute(step, step_extra_inputs(self.model, batch, torch.device("cpu")))
        if logits is None:
            return []
        sampled = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        return list(zip(sampled, sampler(logits, sampled)))

    def execute(self, step: StepInput, extra: dict | None = None) -> torch.Tensor | None:
        """Every rank runs the step; rank 0's full logits of the sampled rows come back."""
        return self._call("execute", step, extra)

    def kv_blocks_that_fit(self, longest: int, sampler: Sampler | None = None) -> int:
        """Each rank's fit; the engine gets the smallest."""
        mine = self._call("kv_blocks_that_fit", longest, local_kwargs={"sampler": sampler})
        return self._guard(lambda: min_over_ranks(mine, self.control))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._call("allocate_kv_cache", num_blocks)

    def capture_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        # Expert parallel dispatch picks its rows with nonzero(), which a CUDA graph cannot capture.
        self._call("capture_graphs", max_num_seqs, max_model_len, capture and not self.config.enable_expert_parallel)

    def kv_block_bytes(self) -> int:
        return self.runner.kv_block_bytes()

    def shutdown(self) -> None:
        """Tell the workers to leave and wait for them (killing any that do not), then close the group.
        After a failure nobody is told (the ranks may be inside different collectives): all are killed."""
        if self._closed:
            return
        self._closed = True
        polite = self._broken is None and hasattr(self, "control") and all(p.is_alive() for p in self.procs)
        if polite:
            try:
                broadcast(("shutdown", ()), self.control)
            except RuntimeError:
                polite = False  # a peer is gone already
        self.control = None  # the group's store (its listening port) closes once nothing refers to it
        self._finalizer.detach()
        _stop(self.procs, self.conns, self._runners, wait_s=5.0 if polite else 0.0)

    # ---- messages and faults -----------------------------------------------------------------------------

    def _call(self, name: str, *args: Any, local_kwargs: dict | None = None) -> Any:
        """Broadcast (name, args) to the workers, then run the same method of rank 0's runner."""
        if self._closed:
            raise RuntimeError("the engine was shut down: build a new one")
        failure = self._worker_failure(wait_s=0)
        if failure is not None:
            raise failure

        def everywhere() -> Any:
            broadcast((name, args), self.control)
            return getattr(self.runner, name)(*args, **(local_kwargs or {}))

        return self._guard(everywhere)

    def _guard(self, action: Callable[[], Any]) -> Any:
        """Run `action`; if it raises, the ranks are out of step for good: every later call raises too, and
        a broken collective is reported as the failed worker's error."""
        if self._broken is not None:
            raise RuntimeError(
                f"an earlier step failed ({type(self._broken).__name__}: {self._broken}); the tensor parallel "
                "ranks are out of step: shut this engine down and build a new one"
            ) from self._broken
        try:
            return action()
        except Exception as error:
            self._broken = error
            failure = self._worker_failure() if isinstance(error, RuntimeError) else None
            if failure is None:
                raise
            raise failure from error

    def _worker_failure(self, wait_s: float = GRACE_S) -> WorkerError | None:
        """A WorkerError for the first local worker that reported an error or died (waiting up to `wait_s`
        for one to do so), or None. Once found, it is the answer to every later call."""
        deadline = time.monotonic() + wait_s
        while True:
            for i, (proc, conn) in enumerate(zip(self.procs, self.conns)):
                while i not in self._errors and not conn.closed and conn.poll():
                    try:
                        kind, text = conn.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "error":
                        self._errors[i] = text
                if i in self._errors or not proc.is_alive():
                    proc.join(1)
                    detail = self._errors.get(i) or f"it died with exit code {proc.exitcode} and sent no error"
                    return WorkerError(f"tensor parallel worker {proc.name} (pid {proc.pid}) failed: {detail}")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _wait_until_joining(self) -> None:
        """Each local worker has loaded the plugins and resolved its platform (or its error is raised): only
        then may rank 0 wait for the group to form, which has no way to notice a peer that never comes."""
        for i, (proc, conn) in enumerate(zip(self.procs, self.conns)):
            ready = wait([conn, proc.sentinel], timeout=COLLECTIVE_TIMEOUT.total_seconds())
            if not ready:
                raise WorkerError(f"tensor parallel worker {proc.name} did not start within {COLLECTIVE_TIMEOUT}")
            kind, text = conn.recv() if conn.poll() else ("dead", "")
            if kind == "error":
                self._errors[i] = text
            if kind != "joining":
                failure = self._worker_failure()
                raise failure or WorkerError(f"tensor parallel worker {proc.name} exited while starting")

    def _watchdog(self) -> None:
        """NCCL collectives wait for a dead peer until their timeout: abort the group at once instead, so the
        driver's blocked step raises (and `_guard` finds the worker's error)."""
        sentinels = [p.sentinel for p in self.procs]
        wait(sentinels)
        if not self._closed:
            logger.error("a tensor parallel worker died: aborting the process group")
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as error:  # best effort: the collective timeout remains
                logger.error("could not abort the process group: %s", error)


def run_node(where: Rendezvous, ranks_per_node: int) -> int:
    """`miniengine worker`: run this host's ranks, `where.rank` in this process and the others spawned."""
    procs, conns = spawn_workers(where.rank, ranks_per_node - 1, where)
    try:
        run_worker(where)
    finally:
        _stop(procs, conns, [])
    return 0

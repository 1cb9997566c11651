"""The engine: the public API, and the loop that ties scheduler, model runner and sampler together.

    add_request(prompt, params) -> tokenize -> n Sequences -> scheduler's waiting queue
    step():  scheduler.schedule() -> runner.run(batch) -> scheduler.step_done(batch)
             -> append each sampled token, check stop ids / EOS / max_tokens, free finished sequences' blocks
             -> one StepDelta: a row (seq id, token id) per sampled token, and the rare news (`step_deltas` ends here)
             -> OutputProcessor: detokenize, stop strings (`finish_sample` ends those) -> RequestOutputs

On a GPU the first line is `AsyncScheduling.step()` instead (async_scheduling.py): it launches this step's
batch and returns the previous step's tokens, so the rest of the loop runs while the GPU computes.

`runner` is a ModelRunner, or with `tensor_parallel_size` > 1 a TensorParallelExecutor (distributed.py) that
runs the same step on every rank and returns rank 0's tokens: this loop is the same either way.

The text work sits behind the delta (output_processor.py), so an engine process can leave all of it to its
front end (engine_process.py): per token, the loop itself touches no strings and builds no object; per
request it only notes the first token (the request's start goes out with it) and the end.

`generate`, `chat` and `stream` are loops over `step` for programs that do not run their own. A step
moves every request, so when such a loop meets outputs of requests it did not add (a host's
`add_request`), it keeps them and the next `step()` hands them back: no output is ever lost. The engine
keeps no global state: a server thread, or a test, can drive several engines side by side.
"""

from __future__ import annotations

import itertools
import time
from array import array
from collections.abc import Iterator, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from miniengine.async_scheduling import AsyncScheduling
from miniengine.block_manager import BlockManager
from miniengine.config import EngineConfig
from miniengine.extra_inputs import extra_input_specs, prepare_extra_inputs
from miniengine.loader import Checkpoint, load_model, open_checkpoint, resolve_dtype
from miniengine.model_runner import ModelRunner
from miniengine.output_processor import OutputProcessor, StepDelta
from miniengine.outputs import RequestOutput, StreamDelta
from miniengine.platforms import resolve_platform
from miniengine.plugins import load_general_plugins, load_stat_logger_plugins
from miniengine.sampler import Sampler
from miniengine.sampling_params import SamplingParams
from miniengine.scheduler import Scheduler
from miniengine.sequence import Sequence
from miniengine.stats import LoggingStatLogger, RequestStats, StatLogger, StepStats

if TYPE_CHECKING:
    from miniengine.distributed import TensorParallelExecutor

Prompt = str | list[int] | dict[str, Any]

MAX_PROMPTS_PER_CALL = 65_536  # generate / chat: every prompt is tokenized and queued before the first step


class PromptTooLongError(ValueError):
    pass


@dataclass(eq=False, slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    params: SamplingParams
    aborted: bool = False
    announced: bool = False  # its start went out in a delta
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None


class Engine:
    def __init__(
        self, model: str | None = None, *, stat_loggers: list[StatLogger] | None = None, **options: Any
    ) -> None:
        """Load `model` (None: the bundled SmolLM2) and size the KV cache; `options` are EngineConfig's fields.

        `stat_loggers` receive every step's `StepStats` (default: one log line every few seconds), and so does
        one logger from each stat-logger plugin.
        """
        self.config = config = EngineConfig(model=model, **options)
        load_general_plugins()  # before any model is resolved: a plugin may register the architecture
        self.stat_loggers: list[StatLogger] = [LoggingStatLogger()] if stat_loggers is None else list(stat_loggers)
        self.stat_loggers += load_stat_logger_plugins()
        self.platform = resolve_platform(config.device)
        self.platform.check_and_update_config(config)
        checkpoint = open_checkpoint(config.model)
        self.model_path = checkpoint.path
        self.hf_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.dtype = resolve_dtype(config.dtype, checkpoint.config, self.platform.default_dtype())
        self.eos_token_ids = self.tokenizer.eos_token_ids if self.tokenizer else set()
        self.sampler = Sampler(self.eos_token_ids, self.platform.device(), config.seed)
        self.runner = self._executor(checkpoint)
        try:
            self.extra_input_specs = extra_input_specs(self.runner.model)
            num_blocks = config.num_kv_blocks or self._num_blocks_that_fit()
            self.runner.allocate_kv_cache(num_blocks)
            self.max_model_len = config.resolve_max_model_len(checkpoint.config, num_blocks * config.block_size)
            if self.platform.supports_graphs:
                self.runner.capture_graphs(config.max_num_seqs, self.max_model_len, not config.enforce_eager)
        except BaseException:
            self.runner.shutdown()  # workers, if any, must not outlive a failed start
            raise
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.async_scheduling = self._async_scheduling()
        self._requests: dict[str, _Request] = {}
        self._finished: list[RequestStats] = []  # requests finished this step, for the stat loggers
        # Sequences that ended since the last delta (this step's stops, and aborts between steps): reported
        # in the next one, which retires their requests once every sample has ended.
        self._ended: dict[int, tuple[str, int | None]] = {}  # seq id -> (finish reason, stop token id)
        self._ended_seqs: list[Sequence] = []
        self._token_times: dict[int, float] = {}  # seq id -> when its last token came (inter-token latency)
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        # Outputs a generate/stream loop met for requests it did not add, for the next step() to hand back.
        self._held: dict[str, RequestOutput] = {}
        self._processor = OutputProcessor(self.tokenizer)

    def _executor(self, checkpoint: Checkpoint) -> ModelRunner | TensorParallelExecutor:
        """What runs the model: a ModelRunner in this process, or (tensor_parallel_size > 1) rank 0's
        ModelRunner plus a worker process for each other rank, behind the same methods (distributed.py)."""
        config = self.config
        if config.tensor_parallel_size > 1:
            from miniengine.distributed import TensorParallelExecutor

            return TensorParallelExecutor(checkpoint, self.platform, self.dtype, config)
        model = load_model(checkpoint, self.platform.device(), self.dtype, config.load_format, config.seed)
        return ModelRunner(model, self.platform, self.dtype, config)

    def _async_scheduling(self) -> AsyncScheduling | None:
        """Overlap each step's host work with the next step's device work (async_scheduling.py) where the
        device runs asynchronously (a GPU); on the CPU the forward runs in this thread, so nothing overlaps."""
        wanted = self.config.async_scheduling
        if wanted is None:
            wanted = self.platform.runs_asynchronously and self.config.tensor_parallel_size == 1
        return AsyncScheduling(self.scheduler, self.runner, self.sampler) if wanted else None

    def shutdown(self) -> None:
        """Stop the tensor parallel workers (if any) and free the KV cache; the engine cannot run after this.
        (Interpreter exit stops the workers too.)"""
        self.runner.shutdown()

    def _num_blocks_that_fit(self) -> int:
        """As many KV blocks as the memory budget holds on every rank, after a profiling run of a full step."""
        longest = self.config.max_model_len or getattr(self.hf_config, "max_position_embeddings", None) or 4096
        num_blocks = self.runner.kv_blocks_that_fit(longest, self.sampler)
        if num_blocks < 1:
            model_bytes = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
            raise MemoryError(
                f"no room for a single KV block ({self.runner.kv_block_bytes():,} bytes) after the weights "
                f"({model_bytes / 2**30:.2f} GiB) and a full step's activations: raise --gpu-memory-utilization, "
                "lower --max-num-batched-tokens, use a smaller model, or split it over more devices "
                "(--tensor-parallel-size)"
            )
        return num_blocks

    # ---- the loop pieces ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt: text, token ids, or {"prompt": text} / {"prompt_token_ids": ids}, either dict with
        "extra_inputs": {name: tensor} for models that take them (extra_inputs.py)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id is None:
            request_id = str(next(self._request_ids))
            while self._in_use(request_id):  # the caller may have chosen this one already
                request_id = str(next(self._request_ids))
        elif not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id).__name__}")
        elif self._in_use(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use: choose another, or pass None")
        text, ids = self._tokenize(prompt)
        self._check_prompt(ids)
        extra = prepare_extra_inputs(self.extra_input_specs, prompt, ids, self.config.block_size)
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, list(ids), params, index, extra_inputs=extra)
            seq.first_sibling = seqs[0] if seqs else None
            seqs.append(seq)
        self._requests[request_id] = _Request(request_id, text, list(ids), seqs, params)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def _in_use(self, request_id: str) -> bool:
        return request_id in self._requests or request_id in self._held

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer.json: send token ids instead of text")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt is a string, a list of token ids, or a dict; got {type(prompt).__name__}")

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        vocab = self.hf_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len} "
                f"(the KV cache holds {self.block_manager.num_blocks * self.block_manager.block_size:,} tokens): "
                "shorten the prompt or raise max_model_len"
            )

    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks are freed now, and the next `step` reports it with finish_reason "abort"."""
        request = self._requests.get(request_id)
        if request is None or request.aborted:
            return
        request.aborted = True
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")

    def finish_sample(self, request_id: str, index: int) -> bool:
        """End sample `index` of a request with finish_reason "stop" (an output processor found one of its stop
        strings) and free its blocks. True if that ended the request: the engine then forgets it without a
        further delta, since the output processor gave its final output already."""
        request = self._requests.get(request_id)
        if request is None or request.aborted:
            return False
        seq = request.seqs[index]
        if not seq.is_finished:
            self._end(seq, "stop")  # not reported: the output processor ended it
        if not all(s.is_finished for s in request.seqs):
            return False
        self._retire(request)
        return True

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes no request is using: the next prompts are computed from scratch."""
        self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        """True while a request runs or an output waits to be handed back by `step`."""
        return bool(self._requests or self._held)

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns an output for each request that got tokens or finished.

        Outputs a `generate` / `stream` loop kept for requests it did not add come first (each output is
        the request's whole state so far, so a newer one of the same request replaces an older one).
        """
        outputs, self._held = self._held, {}
        for out in self._step():
            outputs[out.request_id] = out
        return list(outputs.values())

    def _step_for(self, request_ids: set[str], finished_only: bool = False) -> list[RequestOutput]:
        """One step for a loop that owns `request_ids`: their outputs (with `finished_only`, only those that
        finished: a collecting loop needs no snapshot per token); the others are kept for `step()`."""
        mine = [self._held.pop(r) for r in list(self._held) if r in request_ids]
        for out in self._step(request_ids if finished_only else frozenset()):
            if out.request_id in request_ids:
                mine.append(out)
            else:
                self._held[out.request_id] = out
        return mine

    def _discard(self, request_id: str) -> None:
        """Abort a request a loop owns and forget it: nobody is left to read its final output."""
        self.abort(request_id)
        self._requests.pop(request_id, None)
        self._held.pop(request_id, None)
        self._processor.forget(request_id)

    def step_deltas(self) -> StepDelta:
        """One scheduler step, reported as what is new (output_processor.py), for a front end that runs its own
        OutputProcessor and calls `finish_sample` for each stop string it finds."""
        start, counters = time.monotonic(), self._counters()
        delta, figures = self._advance()
        self._record_stats(start, counters, *figures)
        return delta

    def _step(self, quiet: Set[str] = frozenset()) -> list[RequestOutput]:
        """One scheduler step; an output for each request that moved (those in `quiet`: only when finished)."""
        start, counters = time.monotonic(), self._counters()
        delta, figures = self._advance()
        outputs, stops = self._processor.process(delta, quiet)
        for request_id, index in stops:
            self.finish_sample(request_id, index)
        self._record_stats(start, counters, *figures)
        return outputs

    def _counters(self) -> tuple[int, int, int]:
        return self.block_manager.hits, self.block_manager.queries, self.scheduler.num_preemptions

    def _advance(self) -> tuple[StepDelta, tuple]:
        """Schedule, run and append one step's tokens; the step's delta, and its figures for the stat loggers."""
        if self.async_scheduling is not None:
            batch, sampled = self.async_scheduling.step()  # this batch runs on; the tokens are the last one's
        else:
            batch = self.scheduler.schedule()
            sampled = self.runner.run(batch, self.sampler) if batch.seqs else []
            self.scheduler.step_done(batch)
        now = time.monotonic()
        seq_ids, token_ids = array("q"), array("i")
        delta = StepDelta(seq_ids, token_ids)
        logprobs, times, eos, max_model_len = delta.logprobs, self._token_times, self.eos_token_ids, self.max_model_len
        ttft: list[float] = []
        itl: list[float] = []
        # Per token: plain loop, no helper calls but on a sequence's first token and its end (the hot path).
        for row, (seq, result) in enumerate(sampled):
            seq_id, token_id, params = seq.seq_id, result.token_id, seq.params
            seq.token_ids.append(token_id)
            seq_ids.append(seq_id)
            token_ids.append(token_id)
            if result.logprobs is not None and params.logprobs is not None:
                logprobs[row] = result.logprobs
            last = times.get(seq_id)
            if last is None:
                ttft.append(now - self._first_token(seq, now, delta))
            else:
                itl.append(now - last)
            times[seq_id] = now
            if token_id in params.stop_token_ids:
                self._finish(seq, "stop", token_id)
            elif token_id in eos and not params.ignore_eos:
                self._finish(seq, "stop")
            elif len(seq.token_ids) - seq.num_prompt_tokens == params.max_tokens or len(seq.token_ids) >= max_model_len:
                self._finish(seq, "length")
        if self._ended:
            self._report_ends(delta)
        return delta, (batch.num_prompt_tokens, len(sampled), ttft, itl)

    def _first_token(self, seq: Sequence, now: float, delta: StepDelta) -> float:
        """A sequence's first token: its request starts in this delta if it has not yet; its arrival time."""
        request = self._requests[seq.request_id]
        if request.first_token_time is None:
            request.first_token_time = now
        if not request.announced:
            self._announce(request, delta)
        return request.arrival_time

    def _announce(self, request: _Request, delta: StepDelta) -> None:
        request.announced = True
        first = request.seqs[0]  # its prefix-cache hits are counted at its first schedule, before any token
        delta.started.append(
            (request.request_id, request.prompt, request.prompt_token_ids, request.params, first.seq_id,
             first.num_cached_tokens)
        )  # fmt: skip

    def _report_ends(self, delta: StepDelta) -> None:
        """The sequences that ended since the last delta go in this one; a request whose samples have all ended
        is retired (its id is free from now on)."""
        delta.finished, self._ended = self._ended, {}
        ended, self._ended_seqs = self._ended_seqs, []
        for seq in ended:
            request = self._requests.get(seq.request_id)
            if request is None or request.seqs[seq.index] is not seq:  # retired already (a sibling ended too)
                continue
            if not request.announced:  # aborted before its first token
                self._announce(request, delta)
            if all(s.is_finished for s in request.seqs):
                self._retire(request)
                delta.retired.append(request.request_id)

    def _record_stats(self, start, counters, num_prompt_tokens, num_sampled, ttft, itl) -> None:
        finished, self._finished = tuple(self._finished), []
        if not self.stat_loggers:
            return
        bm, now = self.block_manager, time.monotonic()
        stats = StepStats(
            timestamp=now,
            step_time=now - start,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            num_prompt_tokens=num_prompt_tokens,
            num_generation_tokens=num_sampled,
            prefix_cache_queries=(bm.queries - counters[1]) * bm.block_size,
            prefix_cache_hits=(bm.hits - counters[0]) * bm.block_size,
            num_preemptions=self.scheduler.num_preemptions - counters[2],
            time_to_first_token=tuple(ttft),
            inter_token_latency=tuple(itl),
            finished=finished,
        )
        for stat_logger in self.stat_loggers:
            stat_logger.record(stats)

    def _finish(self, seq: Sequence, reason: str, stop_token_id: int | None = None) -> None:
        """End `seq` and report it in the next delta."""
        self._end(seq, reason)
        self._ended[seq.seq_id] = (reason, stop_token_id)
        self._ended_seqs.append(seq)

    def _end(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq)
        self._token_times.pop(seq.seq_id, None)

    def _retire(self, request: _Request) -> None:
        """The request is done here: forget it, and count it for the stat loggers."""
        del self._requests[request.request_id]
        first = request.seqs[0]
        self._finished.append(
            RequestStats(
                request.request_id,
                first.finish_reason or "abort",
                len(request.prompt_token_ids),
                sum(seq.num_output_tokens for seq in request.seqs),
                first.num_cached_tokens,
                request.arrival_time,
                request.first_token_time,
                time.monotonic(),
            )  # fmt: skip
        )

    # ---- loops for programs that do not run their own ----------------------------------------------------

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt, batched continuously; outputs come back in prompt order."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts: give one, or one each")
        if len(prompts) > MAX_PROMPTS_PER_CALL:
            raise ValueError(
                f"{len(prompts):,} prompts in one call; at most {MAX_PROMPTS_PER_CALL:,}: split them into several calls"
            )
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.add_request(p, sp))
        except BaseException:  # one bad prompt: none of the call's prompts may run as an orphan
            for request_id in ids:
                self._discard(request_id)
            raise
        return self._collect(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> RequestOutput | list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        prompts = [self.chat_prompt(c) for c in conversations]  # type: ignore[arg-type]
        outputs = self.generate(prompts, params, use_tqdm)
        return outputs[0] if single else outputs

    def chat_prompt(self, messages: list[dict]) -> dict:
        """The prompt (token ids) of a conversation under the model's chat template, ready to generate from."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer: chat needs one")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield text deltas of one prompt as they are generated; closing the iterator aborts the request."""
        request_id = self.add_request(prompt, params)
        n = (params or SamplingParams()).n
        sent_chars, sent_tokens, done = [0] * n, [0] * n, set()
        try:
            while self._in_use(request_id):
                for out in self._step_for({request_id}):
                    for c in out.outputs:
                        i = c.index
                        if i in done:
                            continue
                        if len(c.text) > sent_chars[i] or len(c.token_ids) > sent_tokens[i] or c.finished:
                            yield StreamDelta(
                                i, c.text[sent_chars[i] :], c.token_ids[sent_tokens[i] :], c.finish_reason
                            )
                        sent_chars[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                        if c.finished:
                            done.add(i)
        finally:
            self._discard(request_id)

    def _collect(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="generate", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while pending:
                for out in self._step_for(pending, finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        finally:
            bar.close()
            for request_id in pending:
                self._discard(request_id)
        return [done[r] for r in request_ids]

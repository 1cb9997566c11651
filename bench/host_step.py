"""The host's share of a decode step: Engine.step() on a model too small to cost anything.

On a GPU a decode step is a graph replay plus the host's work around it (schedule, prepare the inputs,
sample, read the ids back, append, detokenize, check stops, build outputs). This bench measures that host
work on the CPU, where it can be profiled: a Qwen3-shaped model cut to one layer of width 64 with a
512-token vocabulary (random weights), whose forward is replaced by random hidden states (so the model costs
nothing, yet the sampled tokens vary), and the bundled SmolLM2 tokenizer so detokenizing is real.

    python bench/host_step.py                          # batch 1 and 256: ms per decode step
    python bench/host_step.py --profile                # and cProfile's top functions at the largest batch
    python bench/host_step.py --baseline /tmp/base     # also another checkout's miniengine, in a subprocess

Each prompt has 512 random token ids; each sequence makes 128 tokens (greedy, ignore_eos), once through
`generate` (outputs of finished requests only), once through a loop of `step()` (every request's output
every step, as a server's loop in a thread asks), and once through a loop of `step_deltas()` with each
step's delta pickled as the engine process writes it (what an engine process does per step), then read back
and turned into text and outputs by an OutputProcessor (what its front end, the HTTP process, does per step:
`front_end_ms`; `message_bytes` is the pickled message). Only pure decode steps are counted. `step_ms` is
the wall time of Engine.step(); `model_ms` the part spent in the (stub) forward and the logits; `host_ms` =
step_ms - model_ms is what a GPU step adds on the host, and what async scheduling hides behind the GPU.
Medians over the decode steps of one timed run, after a warm-up run; the profile (decode steps of `step()`)
is of another run. The same code measures an older checkout (`--baseline`): one whose engine process
pickled a list of per-request tuples instead of a StepDelta's `to_wire`.
Writes bench/results/host-step-<device>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pickle
import platform
import pstats
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import model_dir  # noqa: E402
from report import figures_from, versions, write_result  # noqa: E402
from roofline import cpu_model  # noqa: E402

from miniengine import Engine, SamplingParams  # noqa: E402
from miniengine.loader import open_checkpoint  # noqa: E402
from miniengine.output_processor import OutputProcessor  # noqa: E402

try:  # how this checkout's engine process writes a step's delta, and its front end reads it
    from miniengine.engine_process import from_wire, to_wire

    def write_message(delta) -> bytes:
        return pickle.dumps(to_wire(delta), pickle.HIGHEST_PROTOCOL)

    def read_message(message: bytes):
        return from_wire(pickle.loads(message))

except ImportError:  # before StepDelta: a list of per-request tuples, pickled by Connection.send
    write_message, read_message = pickle.dumps, pickle.loads  # type: ignore[assignment]

RESULTS = Path(__file__).resolve().parent / "results"
# generate: outputs only of finished requests (an offline run); step: every request's output every step
# (what a server's loop in a thread asks for, and `stream` for its one request); deltas: the engine process's
# step, token deltas pickled for the front end (checkouts that have Engine.step_deltas)
MODES = ("generate", "step", "deltas")
TINY = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, vocab_size=512)  # fmt: skip


def tiny_model(directory: Path) -> Path:
    """The tiny Qwen3 config beside SmolLM2's tokenizer (its first 512 ids are ordinary tokens)."""
    model_dir("qwen3-0.6b", directory, **TINY)
    tokenizer = open_checkpoint(None).tokenizer
    assert tokenizer is not None
    tokenizer.tokenizer.save(str(directory / "tokenizer.json"))
    return directory


class Timer:
    """Wall time of each Engine.step() and of the model inside it; whether the step was a pure decode."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[tuple[float, float, bool]] = []
        model, step, schedule = engine.runner.model, engine._step, engine.scheduler.schedule
        step_deltas = getattr(engine, "step_deltas", None)
        forward, logits = model.forward, model.compute_logits
        model_s, decode = [0.0], [False]

        def timed(function):
            def call(*args, **kwargs):
                start = time.perf_counter()
                out = function(*args, **kwargs)
                model_s[0] += time.perf_counter() - start
                return out

            return call

        def timed_schedule():
            batch = schedule()
            decode[0] = bool(batch.seqs) and batch.num_tokens == len(batch.seqs)
            return batch

        def recorded(function):
            def call(*args, **kwargs):
                model_s[0] = 0.0
                start = time.perf_counter()
                out = function(*args, **kwargs)
                self.steps.append((time.perf_counter() - start, model_s[0], decode[0]))
                return out

            return call

        timed_step = recorded(step)

        model.forward, model.compute_logits = timed(forward), timed(logits)
        engine._step, engine.scheduler.schedule = timed_step, timed_schedule
        if step_deltas is not None:  # the message's pickling counts: the engine process's sender thread does it
            engine.step_deltas = recorded(lambda: write_message(step_deltas()))

    def decode_figures(self) -> dict:
        decodes = [(s, m) for s, m, decode in self.steps if decode]
        return {
            "decode_steps": len(decodes),
            "step_ms": 1e3 * statistics.median(s for s, _ in decodes),
            "model_ms": 1e3 * statistics.median(m for _, m in decodes),
            "host_ms": 1e3 * statistics.median(s - m for s, m in decodes),
        }


def stub_forward(engine: Engine) -> None:
    """The model's forward returns random hidden states: it costs nothing, and greedy tokens still vary."""
    width, dtype = engine.hf_config.hidden_size, engine.dtype  # the CPU's default dtype may be bfloat16
    generator = torch.Generator().manual_seed(0)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, **extra) -> torch.Tensor:
        return torch.randn(len(input_ids), width, generator=generator, device=input_ids.device).to(dtype)

    engine.runner.model.forward = forward


def setup(batch: int, prompt_len: int, output_len: int) -> tuple[Engine, list[list[int]], SamplingParams]:
    """The tiny engine (stub forward), `batch` random prompts, and the sampling parameters."""
    torch.set_num_threads(1)  # one thread keeps the figures steady on a shared machine
    os.environ.setdefault("MINIENGINE_CPU_COMPILE", "0")  # nothing to compile: the forward is a stub
    directory = tiny_model(Path(tempfile.mkdtemp()))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    blocks_per_seq = -(-(prompt_len + output_len) // 16)
    # One sequence's longest fits (max_model_len at most the cache), and every sequence at once.
    engine = Engine(str(directory), load_format="dummy", max_num_seqs=batch, max_model_len=16 * blocks_per_seq,
                    num_kv_blocks=batch * blocks_per_seq + 16, stat_loggers=[])  # fmt: skip
    stub_forward(engine)
    return engine, prompts, params


def measure(batches: list[int], prompt_len: int, output_len: int) -> dict:
    engine, prompts, params = setup(max(batches), prompt_len, output_len)
    timer = Timer(engine)
    out: dict = {"rows": []}
    for n in batches:
        engine.generate(prompts[:n], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        engine.reset_prefix_cache()
        for mode in MODES:
            if mode == "deltas" and not hasattr(engine, "step_deltas"):
                continue
            timer.steps.clear()
            front_end: list[tuple[float, int, bool]] = []  # per step: seconds, message bytes, a decode step
            if mode == "generate":
                engine.generate(prompts[:n], params, use_tqdm=False)
            else:
                for prompt in prompts[:n]:
                    engine.add_request(prompt, params)
                processor = OutputProcessor(engine.tokenizer)
                while engine.has_unfinished():
                    if mode == "step":
                        engine.step()
                        continue
                    message = engine.step_deltas()
                    start = time.perf_counter()
                    outputs, stops = processor.process(read_message(message))
                    front_end.append((time.perf_counter() - start, len(message), timer.steps[-1][2]))
                    for request_id, index in stops:
                        engine.finish_sample(request_id, index)
            engine.reset_prefix_cache()
            row = {"batch": n, "mode": mode, **timer.decode_figures()}
            if front_end:
                row["front_end_ms"] = 1e3 * statistics.median(s for s, _, decode in front_end if decode)
                row["message_bytes"] = statistics.median(b for _, b, decode in front_end if decode)
            out["rows"].append(row)
    return out


def decode_profile(batch: int, prompt_len: int, output_len: int) -> str:
    """cProfile's top functions over the decode steps of `batch` prompts at once (prefill not profiled)."""
    engine, prompts, params = setup(batch, prompt_len, output_len)
    for prompt in prompts:
        engine.add_request(prompt, params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_tokens - s.num_computed_tokens > 1 for s in scheduler.running):
        engine.step()
    profiler = cProfile.Profile()
    profiler.enable()
    while engine.has_unfinished():
        engine.step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()


def figures_of(directory: str | None, args: argparse.Namespace) -> dict:
    """This file's measurement in a subprocess, importing miniengine from `directory` (None: this checkout)."""
    flags = ["--batches", *map(str, args.batches), "--prompt-len", str(args.prompt_len),
             "--output-len", str(args.output_len)]  # fmt: skip
    return figures_from(__file__, flags, directory)


def best_of(runs: list[dict]) -> dict:
    """Each row's run with the least host time: a busy neighbour only ever adds time."""
    rows = [min(same, key=lambda r: r["host_ms"]) for same in zip(*(run["rows"] for run in runs))]
    return {"rows": rows, "host_ms_of_each_run": [[r["host_ms"] for r in run["rows"]] for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions, largest batch")
    parser.add_argument("--baseline", default=None, help="a directory whose miniengine package is 'before'")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # --baseline's subprocess
    parser.add_argument("--repeats", type=int, default=3, help="runs of each checkout, taking turns; best kept")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.engine_only:
        print(json.dumps(measure(args.batches, args.prompt_len, args.output_len)))
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    result: dict = {
        "benchmark": "host time of a decode step (Engine.step on a negligible model)",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "machine": platform.machine()},
        "versions": versions("torch", "tokenizers", "numpy", "miniengine"),
        "settings": {
            "model": f"qwen3-0.6b preset with {TINY}",
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "sampling": "greedy, ignore_eos",
            "torch_threads": 1,
        },  # fmt: skip
    }
    # Before and after take turns, so a neighbour's load falls on both alike.
    before, after = [], []
    for _ in range(args.repeats):
        if args.baseline:
            before.append(figures_of(args.baseline, args))
        after.append(figures_of(None, args))
    if args.baseline:
        result["before"] = best_of(before)
    result["after"] = best_of(after)
    if args.profile:
        result["after"]["profile"] = decode_profile(max(args.batches), args.prompt_len, args.output_len)
    result["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    print(
        f"{'miniengine':10} {'mode':8} {'batch':>5} {'step ms':>8} {'model ms':>9} {'host ms':>8} {'host us/seq':>11}"
        f" {'front end ms':>12} {'message B':>9}"
    )
    for label in ("before", "after"):
        for row in result.get(label, {}).get("rows", []):
            per_seq = 1e3 * row["host_ms"] / row["batch"]
            front = f"{row['front_end_ms']:12.3f} {row['message_bytes']:9.0f}" if "front_end_ms" in row else ""
            print(f"{label:10} {row.get('mode', 'generate'):8} {row['batch']:5} {row['step_ms']:8.3f} "
                  f"{row['model_ms']:9.3f} {row['host_ms']:8.3f} {per_seq:11.1f} {front}")  # fmt: skip
    if "profile" in result["after"]:
        print(result["after"]["profile"])
    device = re.sub(r"[^a-z0-9]+", "-", result["device"]["cpu"].lower()).strip("-")[:40]
    out = args.out or RESULTS / f"host-step-{device}-{result['date']}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()

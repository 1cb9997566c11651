"""Online serving benchmark: many streaming clients against `miniengine serve`, and, in the same run, the
same workload through the offline `Engine.generate`, so the cost of serving over HTTP is one ratio.

    workload: N requests, random token-id prompts and output lengths (seeded), ignore_eos, greedy; a warm-up
              of the same shapes (other tokens) runs first, untimed, in both modes
    arrivals: Poisson at --request-rate (inf: all at once), at most --max-concurrency in flight
    client:   POST /v1/completions, stream: true; per request: TTFT, the gaps between chunks (ITL), latency,
              and when its response headers came (the server took it: the engine has queued it)
    offline:  the server stopped, one Engine in this process, generate() on the same prompts (--no-offline skips)
    servers:  `miniengine serve` as it runs by default, its engine loop in a process of its own (row "server");
              --server-modes process,thread adds a server whose loop is a thread of the HTTP process (row "thread")

    python bench/serve.py                                       # bundled SmolLM2 on the CPU, 32 requests
    python bench/serve.py --server-modes process,thread         # both placements of the engine loop, one run
    python bench/serve.py --model DIR --device cuda --num-prompts 512 --input-len 512 --output-len 256
    python bench/serve.py --base-url http://127.0.0.1:8000/v1 --model M   # a server already running, of model M

Engine flags (--device, --dtype, --max-num-seqs, ...) are `miniengine serve`'s, given to both the server and the
offline engine. Writes bench/results/serve-<device>-<date>.json: device, command, versions, settings, one row
per mode (request throughput, output tokens/s, TTFT / ITL / latency percentiles, ratio to the roofline floor,
CPU microseconds per output token of the server, its engine process and the clients)
and `server_over_offline`, the fraction of offline output tokens/s the server keeps (`thread_over_offline` too,
with the thread mode). Where TTFT goes: `accepted_ms` is the time from the first request sent until the
server had accepted them all (the last response headers: the burst's intake, with --request-rate inf), and
`engine_ttft_mean_ms` the engine's own mean TTFT over the run (arrival in the engine to first token, from the
server's /metrics), beside the clients' `ttft_ms`. Where the engine's time goes, in both modes: `engine_steps`,
`tokens_per_step_mean` (prompt and sampled tokens a step computed) and `step_ms_mean` (the server's
`iteration_tokens_total` and `engine_step_seconds` histograms; offline, the same from a stat logger).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

import httpx
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import versions, write_result  # noqa: E402
from roofline import DevicePeak, ModelSpec, cpu_model, measure_cpu_peak, measure_gpu_peak  # noqa: E402

from miniengine import Engine, SamplingParams  # noqa: E402
from miniengine.cli import add_config_flags, given  # noqa: E402
from miniengine.config import EngineConfig  # noqa: E402
from miniengine.gguf_loader import bundled_smollm2_path  # noqa: E402
from miniengine.loader import open_checkpoint  # noqa: E402
from miniengine.stats import StepStats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---- the workload ------------------------------------------------------------------------------------------


def workload(args: argparse.Namespace, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request: lengths uniform in len * [1 - range, 1 + range]."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, round(mean * rng.uniform(1 - args.range_ratio, 1 + args.range_ratio)))

    high = min(vocab_size, 30_000)  # ordinary tokens: the low ids of most vocabularies; specials sit at the top
    return [
        ([rng.randrange(100, high) for _ in range(length(args.input_len))], length(args.output_len))
        for _ in range(args.num_prompts)
    ]


# ---- the online client -------------------------------------------------------------------------------------


async def one_request(url: SplitResult, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streaming completion over a connection of its own, read by hand (HTTP/1.1, chunked): an HTTP library
    costs the client more CPU per event than the server spends writing it, and the client must not be the
    limit. Events that arrive in one read share its arrival time."""
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
    ).encode()
    head = (
        f"POST {url.path.rstrip('/')}/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    start = time.perf_counter()
    chunks: list[float] = []
    accepted = start
    output_tokens, done = 0, False
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 80)
    try:
        writer.write(head.encode() + body)
        headers = await reader.readuntil(b"\r\n\r\n")
        accepted = time.perf_counter()
        status = int(headers.split(b" ", 2)[1])
        if status != 200 or b"transfer-encoding: chunked" not in headers.lower():
            return {"error": f"{status}: {(await reader.read()).decode(errors='replace')[:200]}"}
        framed, events = b"", b""  # bytes read but not yet unframed; event text not yet split into events
        while not done and (data := await reader.read(1 << 16)):
            now = time.perf_counter()
            framed += data
            while (eol := framed.find(b"\r\n")) >= 0:  # the chunks of the chunked body
                size = int(framed[:eol], 16)
                if len(framed) < eol + size + 4:
                    break
                events += framed[eol + 2 : eol + 2 + size]
                framed = framed[eol + size + 4 :]
                done = done or size == 0
            *complete, events = events.split(b"\n\n")
            for event in complete:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if chunk.get("choices"):
                    chunks.append(now)
                if chunk.get("usage"):
                    output_tokens = chunk["usage"]["completion_tokens"]
    finally:
        writer.close()
    if not chunks:
        return {"error": "no chunk"}
    return {
        "ttft": chunks[0] - start,
        "itl": [b - a for a, b in zip(chunks, chunks[1:])],
        "latency": chunks[-1] - start,
        "output_tokens": output_tokens,
        "chunks": len(chunks),
        "start": start,
        "accepted": accepted,
    }


async def send_jobs(
    base_url: str,
    model: str,
    jobs: list[tuple[list[int], int]],
    rate: float,
    concurrency: int | None,
    seed: int,
    barrier=None,
) -> tuple[list[dict], float, float, float]:
    """Send `jobs` (Poisson arrivals at `rate`, at most `concurrency` in flight); (results, start, end, cpu):
    wall-clock seconds and this process's CPU seconds meanwhile. With `barrier`, wait there first: the other
    client processes start at the same time."""
    rng = random.Random(seed)
    url = urlsplit(base_url)
    if url.scheme != "http":
        raise ValueError(f"--base-url {base_url}: the benchmark's client speaks plain http only")
    gate = asyncio.Semaphore(concurrency or len(jobs))

    async def limited(prompt: list[int], max_tokens: int) -> dict:
        async with gate:
            return await one_request(url, model, prompt, max_tokens)

    if barrier is not None:
        await asyncio.to_thread(barrier.wait)
    tasks = []
    start, cpu = time.perf_counter(), time.process_time()
    for prompt, max_tokens in jobs:
        tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, start, time.perf_counter(), time.process_time() - cpu


_barrier = None  # a client process's start line, shared with the others (set by the pool's initializer)


def _set_barrier(barrier) -> None:
    global _barrier
    _barrier = barrier


def _client_process(*job_args) -> tuple[list[dict], float, float, float]:
    return asyncio.run(send_jobs(*job_args, barrier=_barrier))


def run_online(
    base_url: str,
    model: str,
    jobs: list[tuple[list[int], int]],
    warm_up: list[tuple[list[int], int]],
    args,
    server_pid: int | None = None,
) -> dict:
    """The timed run after an untimed warm-up. One Python client parses about ten thousand SSE events a second
    at most: `--client-processes N` splits the requests (and the rate, and the concurrency) over N processes,
    so a fast server is not measured at the client's pace. With `server_pid` (a server started here), the row
    has each process's CPU time per output token: the server's (HTTP, one asyncio thread), its engine
    process's (and any workers'), the clients' (summed), and how busy each was (CPU seconds per second)."""
    asyncio.run(send_jobs(base_url, model, warm_up, float("inf"), None, args.seed))
    engine_before = _engine_figures(base_url)
    n = max(1, min(args.client_processes, len(jobs)))
    concurrency = -(-args.max_concurrency // n) if args.max_concurrency else None
    server_cpu = _process_cpu(server_pid) if server_pid else None
    if n == 1:
        outs = [asyncio.run(send_jobs(base_url, model, jobs, args.request_rate, concurrency, args.seed))]
    else:
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(n)
        with ProcessPoolExecutor(n, mp_context=context, initializer=_set_barrier, initargs=(barrier,)) as pool:
            parts = [
                pool.submit(
                    _client_process, base_url, model, jobs[i::n], args.request_rate / n, concurrency, args.seed + i
                )  # fmt: skip
                for i in range(n)
            ]
            outs = [part.result() for part in parts]
    server_cpu = {k: v - server_cpu[k] for k, v in _process_cpu(server_pid).items()} if server_pid else {}
    engine = {k: v - engine_before[k] for k, v in _engine_figures(base_url).items()}
    results = [r for out, _, _, _ in outs for r in out]
    start, end = min(s for _, s, _, _ in outs), max(e for _, _, e, _ in outs)
    errors = [r["error"] for r in results if "error" in r]
    done = [r for r in results if "error" not in r]
    row = _row(end - start, len(done), sum(r["output_tokens"] for r in done), sum(len(p) for p, _ in jobs))
    cpu = {**server_cpu, "clients": sum(c for _, _, _, c in outs)}
    tokens = max(1, row["output_tokens"])
    row.update(
        client_processes=n,
        failed=len(errors),
        first_errors=errors[:3],
        ttft_ms=_percentiles([1e3 * r["ttft"] for r in done]),
        itl_ms=_percentiles([1e3 * x for r in done for x in r["itl"]]),
        latency_ms=_percentiles([1e3 * r["latency"] for r in done]),
        # With client processes, perf_counter is the machine's monotonic clock: comparable across them.
        accepted_ms=1e3 * (max(r["accepted"] for r in done) - min(r["start"] for r in done)) if done else None,
        accept_ms=_percentiles([1e3 * (r["accepted"] - r["start"]) for r in done]),
        engine_ttft_mean_ms=1e3 * engine["ttft_sum"] / engine["ttft_count"] if engine["ttft_count"] else None,
        **_step_figures(engine["steps"], engine["step_tokens"], engine["step_seconds"]),
        # A stream that falls behind gets several tokens in one chunk: the CPU per token depends on how many
        # chunks the server wrote for them.
        chunks_per_token=sum(r["chunks"] for r in done) / tokens,
        cpu_us_per_token={name: 1e6 * seconds / tokens for name, seconds in cpu.items()},
        cpu_busy={name: seconds / row["duration_s"] for name, seconds in server_cpu.items()},
        client_cpu_busy_max=max(c / (e - s) for _, s, e, c in outs),
    )
    return row


_ENGINE_SAMPLES = {  # what _engine_figures reads from /metrics
    "ttft_sum": "time_to_first_token_seconds_sum",
    "ttft_count": "time_to_first_token_seconds_count",
    "steps": "engine_step_seconds_count",
    "step_seconds": "engine_step_seconds_sum",
    "step_tokens": "iteration_tokens_total_sum",
}


def _engine_figures(base_url: str) -> dict[str, float]:
    """The engine's histograms so far from the server's /metrics: TTFT (seconds summed, count), steps, their
    seconds and their tokens. All 0 for a server without them."""
    root = base_url.rstrip("/").removesuffix("/v1")
    figures = dict.fromkeys(_ENGINE_SAMPLES, 0.0)
    try:
        text = httpx.get(root + "/metrics", timeout=30).text
    except httpx.HTTPError:  # a server without /metrics: no engine figure
        return figures
    for line in text.splitlines():
        for key, name in _ENGINE_SAMPLES.items():
            if line.startswith(f"miniengine:{name}{{"):
                figures[key] += float(line.rsplit(" ", 1)[1])
    return figures


def _step_figures(steps: float, tokens: float, seconds: float) -> dict:
    if not steps:
        return {}
    return {"engine_steps": int(steps), "tokens_per_step_mean": tokens / steps, "step_ms_mean": 1e3 * seconds / steps}


class _StepCounter:
    """The offline engine's steps, their tokens and time: the figures the server's histograms give."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = self.tokens = 0
        self.seconds = 0.0

    def record(self, stats: StepStats) -> None:
        self.steps += 1
        self.tokens += stats.num_prompt_tokens + stats.num_generation_tokens
        self.seconds += stats.step_time


def _process_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server process and of its child processes (the engine
    process, with any workers of its own)."""
    server = psutil.Process(pid)
    children = server.children(recursive=True)

    def seconds(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return times.user + times.system

    figures = {"server": seconds(server)}
    if children:
        figures["engine"] = sum(seconds(child) for child in children)
    return figures


# ---- the server, started here ------------------------------------------------------------------------------


class Server:
    """`miniengine serve` in a child process on a free loopback port; its log goes to a temporary file."""

    def __init__(self, model: str | None, engine_flags: list[str], log: Path, engine_process: bool = True) -> None:
        command = [sys.executable, "-m", "miniengine", "serve", *([model] if model else []), "--port", "0"]
        command += ["--max-waiting-requests", "1000000", *engine_flags]
        command += [] if engine_process else ["--no-engine-process"]
        self.log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=900)
        match = re.search(r"serving (\S+) at (http://\S+/v1)", ready[0] if ready else "")
        if match is None:
            self.stop()
            raise RuntimeError(f"the server did not start; see {log}")
        self.model, self.base_url = match.group(1), match.group(2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


# ---- offline, the same workload ----------------------------------------------------------------------------


def run_offline(
    model: str | None, options: dict, jobs: list[tuple[list[int], int]], warm_up: list[tuple[list[int], int]]
) -> tuple[dict, Engine]:
    counter = _StepCounter()
    engine = Engine(model, **options, stat_loggers=[counter])
    for batch in (warm_up, jobs):
        engine.reset_prefix_cache()
        counter.reset()  # the timed batch's steps only
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in batch]
        start, cpu = time.perf_counter(), time.process_time()
        outs = engine.generate([p for p, _ in batch], params, use_tqdm=False)
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = _row(duration, len(outs), tokens, sum(len(p) for p, _ in jobs))
    # The engine's own CPU per output token, beside the engine process's in a server row.
    row.update(cpu_us_per_token={"engine": 1e6 * cpu / max(1, tokens)}, cpu_busy={"engine": cpu / duration})
    row.update(_step_figures(counter.steps, counter.tokens, counter.seconds))
    return row, engine


# ---- figures -----------------------------------------------------------------------------------------------


def _row(duration: float, requests: int, output_tokens: int, prompt_tokens: int) -> dict:
    return {
        "duration_s": duration,
        "requests": requests,
        "request_throughput": requests / duration,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / duration,
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"mean": sum(ordered) / len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def workload_floor(spec: ModelSpec, peak: DevicePeak, jobs: list[tuple[list[int], int]]) -> float:
    """A lower bound on any engine's time for the whole workload on this device: every token's FLOPs at the
    peak rate, and at least one read of all the weights per token of the longest output (decode is serial)."""
    prompt, output = sum(len(p) for p, _ in jobs), sum(m for _, m in jobs)
    flops = 2 * spec.body_params * (prompt + output) + 2 * spec.head_params * output
    return max(flops / peak.flops, max(m for _, m in jobs) * spec.weight_bytes / peak.bandwidth)


def _device(options: dict) -> tuple[str, dict]:
    if options.get("device", "auto") in ("auto", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return "cuda", {"gpu": name}
    return "cpu", {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def print_table(result: dict) -> None:
    s = result["settings"]
    print(
        f"\n{s['num_prompts']} requests, prompts ~{s['input_len']} tokens, outputs ~{s['output_len']} tokens "
        f"(+-{100 * s['range_ratio']:.0f}%), rate {s['request_rate']}/s, concurrency {s['max_concurrency'] or 'any'}"
    )
    header = f"{'mode':8} {'req/s':>7} {'out tok/s':>10} {'TTFT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>21}"
    header += f" {'ratio':>6}"
    print(header + "\n" + "-" * len(header))
    for name, row in result["rows"].items():
        ttft, itl = row.get("ttft_ms", {}), row.get("itl_ms", {})
        fmt = lambda p: "/".join(f"{p[k]:.0f}" for k in ("p50", "p90", "p99")) if p else "-"  # noqa: E731
        print(
            f"{name:8} {row['request_throughput']:7.2f} {row['output_tokens_per_s']:10.1f} {fmt(ttft):>22} "
            f"{fmt(itl):>21} {row.get('ratio_to_floor', float('nan')):6.3f}"
        )
    for name, row in result["rows"].items():
        if name == "offline" and "cpu_us_per_token" in row:
            print(f"offline: CPU us per output token, engine {row['cpu_us_per_token']['engine']:.1f}")
        elif "cpu_us_per_token" in row:
            busy = {**row["cpu_busy"], "clients": row["client_cpu_busy_max"]}
            print(
                f"{name}: CPU us per output token "
                + ", ".join(f"{k} {v:.1f} ({busy[k]:.0%} busy)" for k, v in row["cpu_us_per_token"].items())
                + f" (clients: {row['client_processes']}, the busiest's share)"
                + f"; {row['chunks_per_token']:.2f} chunks/token"
            )
    for name, row in result["rows"].items():
        if row.get("accepted_ms") is not None:
            engine = row.get("engine_ttft_mean_ms")
            print(
                f"{name}: the burst accepted in {row['accepted_ms']:.0f} ms; TTFT mean {row['ttft_ms']['mean']:.0f} ms"
                + (f" at the client, {engine:.0f} ms in the engine" if engine is not None else "")
            )
    for name, row in result["rows"].items():
        if "engine_steps" in row:
            print(
                f"{name}: {row['engine_steps']} engine steps, {row['tokens_per_step_mean']:.0f} tokens "
                f"and {row['step_ms_mean']:.2f} ms each on average"
            )
    for row in ("server", "thread"):
        if f"{row}_over_offline" in result:
            print(f"{row} / offline output tokens/s: {result[f'{row}_over_offline']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF-style directory or .gguf file (default: bundled SmolLM2)")
    parser.add_argument("--base-url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--range-ratio", type=float, default=0.5, help="lengths vary by this fraction either way")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--seed", type=int, default=0, help="the workload's seed")
    parser.add_argument(
        "--client-processes", type=int, default=1, help="client processes sharing the requests (a fast server)"
    )
    parser.add_argument("--no-offline", action="store_true", help="skip the offline generate() row")
    parser.add_argument(
        "--server-modes",
        default="process",
        help="where each server started runs its engine loop, in order: process (row 'server', the default of "
        "`miniengine serve`), thread (row 'thread', `--no-engine-process`); e.g. process,thread",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of the server and the offline engine (CPU)"
    )
    parser.add_argument("--out", type=Path, default=None)
    engine_names = add_config_flags(parser, EngineConfig, skip=("model", "seed"))
    args = parser.parse_args()
    options = given(args, engine_names)
    if args.threads:  # on a shared CPU, one thread each is far less sensitive to other processes
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's torch reads it at start

    if args.base_url and args.model is None:
        parser.error("--base-url: also pass --model, the checkpoint that server runs: its vocabulary bounds the "
                     "workload's random token ids")  # fmt: skip
    model_path = args.model or bundled_smollm2_path()
    vocab_size = open_checkpoint(model_path).config.vocab_size
    jobs = workload(args, vocab_size, args.seed)
    # Untimed, first: requests of the same shapes with other tokens (no prefix-cache head start later).
    warm_up = workload(args, vocab_size, args.seed + 1)[:64]
    device, device_info = _device(options)
    date = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    if args.base_url:
        with httpx.Client() as client:
            served = client.get(args.base_url + "/models").json()["data"][0]["id"]
        rows["server"] = run_online(args.base_url, served, jobs, warm_up, args)
    else:
        for mode in args.server_modes.split(","):
            if mode not in ("process", "thread"):
                parser.error(f"--server-modes: {mode!r} is neither 'process' nor 'thread'")
            log = Path(tempfile.gettempdir()) / f"serve-{mode}-{device}-{date}.log"
            server = Server(args.model, _as_flags(options), log, engine_process=mode == "process")
            try:
                row = "server" if mode == "process" else "thread"
                rows[row] = run_online(server.base_url, server.model, jobs, warm_up, args, server.proc.pid)
            finally:
                server.stop()
    spec = peak = None
    if not args.base_url and not args.no_offline:
        rows["offline"], engine = run_offline(args.model, options, jobs, warm_up)
        spec = ModelSpec.from_model(engine.runner.model, engine.hf_config, engine.dtype)
        del engine
        peak = measure_gpu_peak() if device == "cuda" else measure_cpu_peak(quick=True)
    if spec is not None and peak is not None:
        floor = workload_floor(spec, peak, jobs)
        for row in rows.values():
            row["ratio_to_floor"] = floor / row["duration_s"]  # as every bench has it: 1.0 is the hardware limit

    result = {
        "benchmark": "online serving (miniengine serve) beside offline generate",
        "date": date,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {"type": device, **device_info},
        "versions": versions("miniengine", "torch", "fastapi", "uvicorn", "httpx"),
        "settings": {
            "model": os.path.basename(model_path.rstrip("/")),
            "engine_options": options,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
            "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
            "max_concurrency": args.max_concurrency,
            "threads": args.threads or "torch default",
            "server_modes": args.server_modes,
            "seed": args.seed,
            "prompt_tokens_total": sum(len(p) for p, _ in jobs),
            "output_tokens_total": sum(m for _, m in jobs),
            "sampling": "greedy, ignore_eos: every request generates exactly its output length",
        },
        "rows": rows,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if peak is not None:
        result["roofline"] = {"peak_flops": peak.flops, "peak_bandwidth": peak.bandwidth, "source": peak.source}
        result["roofline"]["floor_s"] = workload_floor(spec, peak, jobs)  # type: ignore[arg-type]
    for row in ("server", "thread"):
        if "offline" in rows and row in rows:
            ratio = rows[row]["output_tokens_per_s"] / rows["offline"]["output_tokens_per_s"]
            result[f"{row}_over_offline"] = ratio
    print_table(result)
    out = args.out or RESULTS / f"serve-{device}-{date}.json"
    write_result(result, out)


def _as_flags(options: dict) -> list[str]:
    """The engine options given here, as `miniengine serve` flags."""
    flags = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        flags += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return flags


if __name__ == "__main__":
    main()

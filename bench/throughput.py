"""Offline throughput on the CPU: miniengine against transformers' batched `generate`, same prompts, same model.

Both run the bundled SmolLM2-135M-Instruct GGUF (dequantized to float32) on the same chat-templated token
ids, greedily, for exactly `--max-tokens` new tokens each (miniengine: ignore_eos; transformers:
min_new_tokens, which masks EOS instead). Loading and a tiny warm-up run are not timed; only the generate
call is. The roofline floor (bench/roofline.py, CPU peaks measured in this run) says how far each is from
what the hardware allows.

    python bench/throughput.py                                   # 32 prompts x 128 tokens
    python bench/throughput.py --num-prompts 8 --max-tokens 16   # a quick check
    python bench/throughput.py --skip-hf                         # miniengine alone
    python bench/throughput.py --preset qwen3-0.6b               # a real model shape on the GPU (offline.py)

Writes bench/results/throughput-cpu-<date>.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import versions, write_result  # noqa: E402
from roofline import ModelSpec, best_peak, cpu_model, generation_floor, measure_cpu_peak  # noqa: E402

from miniengine import Engine, SamplingParams  # noqa: E402
from miniengine.gguf_loader import bundled_smollm2_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Varied, realistic requests: questions, instructions, rewriting, code, short and long.
PROMPTS = [
    "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?",
    "Explain the difference between a process and a thread to a first-year computer science student.",
    "Write a haiku about autumn rain on a tin roof.",
    "Give me three tips for staying focused while working from home.",
    "Summarize the plot of Romeo and Juliet in four sentences.",
    "How does a refrigerator keep food cold? Explain the refrigeration cycle step by step.",
    "Write a Python function that checks whether a string is a palindrome, ignoring spaces and case.",
    "What are the main causes of inflation, and how do central banks try to control it?",
    "Translate into French: 'The train leaves at seven, so we should be at the station by half past six.'",
    "I have eggs, spinach, a little cheese and some bread. What can I cook for dinner in twenty minutes?",
    "Describe the water cycle for a ten-year-old.",
    "What is the difference between weather and climate?",
    "Draft a polite email to my landlord asking when the broken heater in the living room will be repaired.",
    "List five common mistakes beginners make when learning to play the guitar.",
    "Why is the sky blue during the day but red and orange at sunset?",
    "Explain what a hash table is and why lookups are usually fast.",
    "Write a short motivational message for a friend who is running their first marathon tomorrow.",
    "What were the main consequences of the invention of the printing press in Europe?",
    "How do vaccines train the immune system to recognise a virus?",
    "Compare electric cars and petrol cars in terms of running costs, maintenance and environmental impact.",
    "Write a SQL query that returns the ten customers who spent the most money in 2023, from a table "
    "orders(customer_id, amount, created_at).",
    "What is photosynthesis, and why does it matter for life on Earth?",
    "Give me a simple weekly workout plan for someone who can exercise three times a week for thirty minutes.",
    "Explain recursion with an example that does not use factorials or Fibonacci numbers.",
    "Rewrite this sentence to sound more formal: 'Hey, we can't make it to the meeting, something came up.'",
    "What should I pack for a three-day hiking trip in the mountains in early spring?",
    "Tell me a short story about a robot who learns to paint.",
    "How does compound interest work? Show the calculation for 1000 dollars at 5 percent over three years.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name and a one-line slogan for a small bakery that specialises in sourdough bread.",
    "Explain, in plain words, what a large language model does when it generates text.",
    "Why do we have leap years, and how is it decided which years are leap years?",
]


def chat_token_ids(engine: Engine, texts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn of the model's chat template, tokenized once for both engines."""
    tok = engine.tokenizer
    assert tok is not None
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False) for t in texts
    ]


def prompt_list(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# ---- miniengine ------------------------------------------------------------------------------------------


class StepTimer:
    """Wraps an engine's `step` and its runner's `run` (instance attributes only) to time each step."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[dict] = []
        step, run = engine.step, engine.runner.run
        current: dict = {}

        def timed_run(batch, *args):
            start = time.perf_counter()
            out = run(batch, *args)
            current.update(run_s=time.perf_counter() - start, seqs=len(batch.seqs), tokens=batch.num_tokens)
            return out

        def timed_step():
            current.clear()
            start = time.perf_counter()
            out = step()
            self.steps.append({"step_s": time.perf_counter() - start, **current})
            return out

        engine.step, engine.runner.run = timed_step, timed_run

    def reset(self) -> None:
        self.steps.clear()

    def summary(self) -> dict:
        steps = [s for s in self.steps if "run_s" in s]
        decodes = [s for s in steps if s["tokens"] == s["seqs"]]
        total = sum(s["step_s"] for s in steps)
        run = sum(s["run_s"] for s in steps)
        return {
            "steps": len(steps),
            "prefill_steps": len(steps) - len(decodes),
            "prefill_s": sum(s["step_s"] for s in steps if s not in decodes),
            "decode_steps": len(decodes),
            "decode_step_ms_mean": 1e3 * sum(s["step_s"] for s in decodes) / max(len(decodes), 1),
            "runner_s": run,  # model forward + sampling
            "engine_overhead_s": total - run,  # scheduling, block tables, detokenization, outputs
        }


def run_miniengine(engine: Engine, timer: StepTimer, ids: list[list[int]], max_tokens: int) -> tuple[float, list]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.reset_prefix_cache()  # no head start from earlier runs of the same prompts: transformers has none
    timer.reset()
    start = time.perf_counter()
    outs = engine.generate(ids, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == max_tokens for t in tokens), "miniengine did not generate exactly max_tokens tokens"
    return elapsed, tokens


# ---- transformers ----------------------------------------------------------------------------------------


def load_hf(gguf_path: str):
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval()


def pad_token_id(model, fallback: int) -> int:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else fallback
    return int(pad)


def left_pad(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)
    return input_ids, mask


@torch.inference_mode()
def run_hf(model, ids: list[list[int]], max_tokens: int, pad: int) -> tuple[float, list]:
    input_ids, mask = left_pad(ids, pad)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    elapsed = time.perf_counter() - start
    tokens = out[:, input_ids.shape[1] :].tolist()
    assert all(len(t) == max_tokens for t in tokens), "transformers did not generate exactly max_tokens tokens"
    return elapsed, tokens


def hf_eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, list) else [eos])


# ---- comparison and report -------------------------------------------------------------------------------


def agreement(ours: list[list[int]], theirs: list[list[int]], eos_ids: set[int]) -> dict:
    """Greedy-token agreement. transformers' min_new_tokens masks EOS while miniengine's ignore_eos does not,
    so where miniengine picks an EOS the two differ by construction: the second count stops before it."""
    full = before_eos = 0
    prefix = []
    for a, b in zip(ours, theirs):
        full += a == b
        cut = next((i for i, t in enumerate(a) if t in eos_ids), len(a))
        before_eos += a[:cut] == b[:cut]
        prefix.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
    return {
        "outputs": len(ours),
        "identical": full,
        "identical_before_first_eos": before_eos,
        "outputs_with_eos": sum(any(t in eos_ids for t in a) for a in ours),
        "mean_common_prefix_tokens": sum(prefix) / max(len(prefix), 1),
    }


def device_info() -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def figures(elapsed: float, num_prompts: int, max_tokens: int, steps: int, floor_s: float) -> dict:
    return {
        "generate_s": elapsed,
        "output_tokens": num_prompts * max_tokens,
        "output_tokens_per_s": num_prompts * max_tokens / elapsed,
        "ms_per_step": 1e3 * elapsed / steps,
        "floor_ratio": elapsed / floor_s,  # measured time / roofline floor: 1.0 is the hardware limit
    }


def print_table(result: dict) -> None:
    s = result["settings"]
    floor = result["roofline"]["floor"]
    print()
    print(
        f"{s['num_prompts']} prompts x {s['max_tokens']} tokens, greedy, fp32, {result['device']['cpu']}, "
        f"{result['device']['torch_threads']} threads, load {result['load_average']['before']}"
    )
    print(
        f"roofline floor: {floor['total_s']:.2f} s (prefill {floor['prefill_s']:.2f} s, "
        f"{floor['decode_steps']} decode steps {floor['decode_s']:.2f} s, {floor['decode_step_ms_mean']:.1f} ms/step)"
    )
    header = f"{'engine':14} {'time s':>8} {'tok/s':>8} {'ms/step':>8} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for name, key in (("miniengine", "miniengine"), ("transformers", "transformers")):
        r = result.get(key)
        if r:
            print(
                f"{name:14} {r['generate_s']:8.2f} {r['output_tokens_per_s']:8.1f} {r['ms_per_step']:8.1f} "
                f"{r['floor_ratio']:8.2f}"
            )
    m = result["miniengine"]
    print(
        f"miniengine: prefill {m['prefill_s']:.2f} s in {m['prefill_steps']} step(s), decode "
        f"{m['decode_step_ms_mean']:.1f} ms/step (x floor: prefill {m['prefill_floor_ratio']:.2f}, decode "
        f"{m['decode_floor_ratio']:.2f}), outside the runner {m['engine_overhead_s']:.2f} s"
    )
    if result.get("transformers"):
        a = result["agreement"]
        print(f"miniengine / transformers throughput: {result['ratio_miniengine_over_transformers']:.2f}x")
        print(
            f"greedy agreement: {a['identical']}/{a['outputs']} identical, {a['identical_before_first_eos']}/"
            f"{a['outputs']} identical before miniengine's first EOS ({a['outputs_with_eos']} outputs contain one), "
            f"mean common prefix {a['mean_common_prefix_tokens']:.1f} tokens"
        )


def main() -> None:
    if "--preset" in sys.argv:  # the GPU workload on a real model shape lives in offline.py
        from offline import main as offline_main

        return offline_main()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each engine; the fastest is reported")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/...)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    peak_before = measure_cpu_peak()
    print(f"CPU peaks: {peak_before.flops / 1e9:.1f} GFLOP/s fp32, {peak_before.bandwidth / 1e9:.1f} GB/s")

    gguf_path = bundled_smollm2_path()
    t0 = time.perf_counter()
    engine = Engine()
    engine_load_s = time.perf_counter() - t0
    timer = StepTimer(engine)
    ids = chat_token_ids(engine, prompt_list(args.num_prompts))
    spec = ModelSpec.from_model(engine.runner.model, engine.hf_config, engine.dtype)

    hf_model = pad = None
    hf_load_s = None
    if not args.skip_hf:
        t0 = time.perf_counter()
        hf_model = load_hf(gguf_path)
        hf_load_s = time.perf_counter() - t0
        pad = pad_token_id(hf_model, fallback=ids[0][0])

    # Warm-up: a tiny run of each, untimed.
    run_miniengine(engine, timer, ids[:2], 4)
    if hf_model is not None:
        run_hf(hf_model, ids[:2], 4, pad)

    me_times, hf_times = [], []
    me_tokens = hf_tokens = None
    me_steps: dict = {}
    load_during = []
    for _ in range(args.repeats):
        elapsed, me_tokens = run_miniengine(engine, timer, ids, args.max_tokens)
        if not me_times or elapsed < min(me_times):
            me_steps = timer.summary()
        me_times.append(elapsed)
        load_during.append([round(x, 2) for x in os.getloadavg()])
        if hf_model is not None:
            elapsed, hf_tokens = run_hf(hf_model, ids, args.max_tokens, pad)
            hf_times.append(elapsed)
            load_during.append([round(x, 2) for x in os.getloadavg()])

    # The peaks again, after the runs: the floor takes the best of both (the highest rate the machine showed).
    peak_after = measure_cpu_peak()
    peak = best_peak(peak_before, peak_after)
    floor = generation_floor(spec, peak, [len(x) for x in ids], args.max_tokens)

    me = figures(min(me_times), args.num_prompts, args.max_tokens, me_steps["steps"], floor["total_s"])
    me.update(me_steps, all_generate_s=me_times)
    me["prefill_floor_ratio"] = me["prefill_s"] / floor["prefill_s"]
    me["decode_floor_ratio"] = me["decode_step_ms_mean"] / floor["decode_step_ms_mean"]
    result: dict = {
        "benchmark": "offline throughput, CPU",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_info(),
        "versions": versions("torch", "transformers", "miniengine"),
        "settings": {
            "model": os.path.basename(gguf_path),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "num_prompts": args.num_prompts,
            "max_tokens": args.max_tokens,
            "prompt_tokens_total": sum(len(x) for x in ids),
            "prompt_tokens_min_max": [min(len(x) for x in ids), max(len(x) for x in ids)],
            "prompt_format": "chat template, one user turn; same token ids for both engines",
            "sampling": "greedy; miniengine ignore_eos=True; transformers min_new_tokens=max_new_tokens",
            "transformers_batching": "all prompts in one generate call, left-padded, attention mask",
            "repeats": args.repeats,
            "threads": args.threads or "torch default",
            "load_s": {"miniengine": engine_load_s, "transformers": hf_load_s},
        },
        "roofline": {
            "peak": {
                "name": peak.name,
                "fp32_flops": peak.flops,
                "bandwidth_bytes_per_s": peak.bandwidth,
                "source": peak.source,
                "measured": [
                    {"fp32_flops": p.flops, "bandwidth_bytes_per_s": p.bandwidth, "source": p.source}
                    for p in (peak_before, peak_after)
                ],
            },
            "model": {
                "params": spec.num_params,
                "body_params": spec.body_params,
                "lm_head_params": spec.head_params,
                "weight_bytes": spec.weight_bytes,
                "kv_bytes_per_token": spec.kv_bytes_per_token,
            },
            "floor": floor,
        },
        "miniengine": me,
        "load_average": {"before": [round(x, 2) for x in load_before], "during": load_during},
    }
    if hf_model is not None:
        hf = figures(min(hf_times), args.num_prompts, args.max_tokens, args.max_tokens, floor["total_s"])
        hf["all_generate_s"] = hf_times
        result["transformers"] = hf
        result["ratio_miniengine_over_transformers"] = me["output_tokens_per_s"] / hf["output_tokens_per_s"]
        eos = set(engine.eos_token_ids) | hf_eos_ids(hf_model)
        result["agreement"] = agreement(me_tokens, hf_tokens, eos)
    result["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]

    print_table(result)
    out = args.out or RESULTS / f"throughput-cpu-{result['date']}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()

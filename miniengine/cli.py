"""The command line: `miniengine generate [options] PROMPT...` (also `python -m miniengine generate`)."""

from __future__ import annotations

import argparse
import sys

from miniengine.engine import Engine
from miniengine.sampling_params import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniengine", description="A minimal LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete prompts and print the completions")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", default=None, help="HF-style directory or .gguf file (default: bundled SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt at a time)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
        )  # fmt: skip
        engine = Engine(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
        prompts = [engine.chat_prompt([{"role": "user", "content": p}]) if args.chat else p for p in args.prompts]
        return _run(engine, args.prompts, prompts, params, args.stream)
    except (ValueError, FileNotFoundError) as error:  # bad options, no model, a prompt too long, no chat template
        print(f"miniengine: {error}", file=sys.stderr)
        return 2


def _run(engine: Engine, texts: list[str], prompts: list, params: SamplingParams, stream: bool) -> int:
    if stream:
        for prompt in prompts:
            for delta in engine.stream(prompt, params):
                print(delta.text, end="", flush=True)
            print()
        return 0
    for text, out in zip(texts, engine.generate(prompts, params)):
        for completion in out.outputs:
            print(f"--- {text!r} [{completion.index}] ({completion.finish_reason})")
            print(completion.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

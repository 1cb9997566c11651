"""The command line: `miniengine generate [options] PROMPT...`, `miniengine serve [MODEL] [options]`, and
`miniengine worker ...` (the tensor parallel ranks of another host: distributed.py) (also `python -m
miniengine ...`).

The engine's flags are made from `EngineConfig`'s fields in one place (`add_config_flags`), spelled as
vLLM spells them (`max_num_seqs` -> `--max-num-seqs`, a bool -> `--enable-prefix-caching` and
`--no-enable-prefix-caching`), so an option added to the config arrives on both commands with its flag.
The server's own flags come from `ServerConfig` the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from miniengine.config import EngineConfig
from miniengine.engine import Engine
from miniengine.platforms import resolve_platform
from miniengine.sampling_params import SamplingParams

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the log lines of every miniengine process

_TYPES = {"str": str, "int": int, "float": float}


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Add a `--flag` for each field of the dataclass `config_class`; returns the field names.

    Every flag defaults to None ("not given"), so the dataclass's own default applies to what is not given.
    """
    group = parser.add_argument_group(f"{config_class.__name__} options")
    names = []
    for f in dataclasses.fields(config_class):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"default: {default}"
        annotation = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
        if annotation == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, type=_TYPES.get(annotation, str), default=None, help=help_text)
        names.append(f.name)
    return names


def given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def build_parser() -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    parser = argparse.ArgumentParser(prog="miniengine", description="A minimal LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete prompts and print the completions")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", default=None, help="HF-style directory or .gguf file (default: bundled SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt at a time)")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    engine_names = add_config_flags(gen, EngineConfig, skip=("model",))

    from miniengine.server.config import ServerConfig  # light: the server's heavy imports come with `serve`

    srv = commands.add_parser("serve", help="serve the OpenAI API over HTTP (see README)")
    srv.add_argument("model", nargs="?", default=None, help="HF-style directory or .gguf file (default: SmolLM2)")
    add_config_flags(srv, EngineConfig, skip=("model",))
    server_names = add_config_flags(srv, ServerConfig)

    work = commands.add_parser("worker", help="run this host's tensor parallel ranks of an engine on another host")
    work.add_argument("--distributed-init-method", required=True, help="tcp://HOST:PORT of the engine's host")
    work.add_argument("--tensor-parallel-size", type=int, required=True, help="all ranks, on every host")
    work.add_argument("--nnodes", type=int, required=True, help="hosts in all")
    work.add_argument("--node-rank", type=int, required=True, help="this host: 1 .. nnodes-1 (0 runs the engine)")
    work.add_argument("--device", default="auto")
    return parser, engine_names, server_names


def main(argv: list[str] | None = None) -> int:
    parser, engine_names, server_names = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args, engine_names, server_names)
        if args.command == "worker":
            return _worker(args)
        params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=args.stop,
        )  # fmt: skip
        options = given(args, engine_names)
        if "enforce_eager" not in options and resolve_platform(options.get("device", "auto")).name == "cpu":
            # One-shot: a compiled decode step costs seconds at start-up, more than a few hundred tokens save.
            options["enforce_eager"] = True
        engine = Engine(args.model, **options)
        prompts = [engine.chat_prompt([{"role": "user", "content": p}]) if args.chat else p for p in args.prompts]
        return _run(engine, args.prompts, prompts, params, args.stream)
    except (ValueError, FileNotFoundError) as error:  # bad options, no model, a prompt too long, no chat template
        print(f"miniengine: {error}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace, engine_names: list[str], server_names: list[str]) -> int:
    from miniengine.server import ServerConfig, serve

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    options = given(args, server_names)
    # A key on the command line shows in `ps`; the environment does not.
    options.setdefault("api_key", os.environ.get("MINIENGINE_API_KEY") or None)
    return serve(args.model, ServerConfig(**options), given(args, engine_names))


def _worker(args: argparse.Namespace) -> int:
    from miniengine.distributed import Rendezvous, run_node

    size, nnodes, node = args.tensor_parallel_size, args.nnodes, args.node_rank
    if nnodes < 2 or size % nnodes or not 0 < node < nnodes:
        raise ValueError(
            f"--nnodes {nnodes} --node-rank {node} --tensor-parallel-size {size}: a worker host needs nnodes >= 2, "
            "node-rank in 1..nnodes-1 (host 0 runs the engine), and a size that is a multiple of nnodes"
        )
    per_node = size // nnodes
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return run_node(Rendezvous(args.distributed_init_method, size, node * per_node, 0, args.device), per_node)


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

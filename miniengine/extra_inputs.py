"""Extra per-request inputs: tensors a prompt carries beside its token ids (image features, action vectors).

A model that takes them declares each one in `model.extra_input_specs` (name -> `ExtraInputSpec`): the
placeholder token that marks its positions in a prompt, the shape and dtype of one row (one row per
placeholder), and dummy rows for memory profiling. The model merges the rows into its input embeddings; the
engine only carries them, and slices them to the positions each step feeds:

    prompt        i0 i1 i2 A  | A  i3 i4 A  | A  i5         A: placeholder of "actions", 4 rows of shape (3,)
    blocks (B=4)  block 0     | block 1     | block 2
    prefix key    (prefix, tokens, digest of row 0) (.., digest of rows 1, 2) (.., digest of row 3)
    a step feeding positions 4..7 (a prefill chunk) -> rows 1 and 2, at the flat rows of positions 4 and 7

- `add_request` calls `prepare_extra_inputs`: names, dtype, shape and the row count (= placeholders in the
  prompt) are checked before anything is allocated, and each block's digest is computed for its
  prefix-cache key, so equal inputs share K/V blocks and different ones never do.
- each step, `step_extra_inputs` gives the model `extra_inputs={name: ExtraInputRows(index, values)}` for the
  rows the step feeds. Chunked prefill, recompute after preemption and partial prefix hits only move the
  window of positions a step feeds, so they need nothing else. Generated tokens never carry rows.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from miniengine.scheduler import ScheduledBatch


class ExtraInputError(ValueError):
    pass


@dataclass(frozen=True)
class ExtraInputSpec:
    """One extra input a model takes."""

    placeholder_token_id: int  # prompt tokens that carry one row of this input each
    shape: tuple[int, ...]  # of one row
    dtype: torch.dtype
    dummy: Callable[[int], torch.Tensor] | None = None  # n -> n rows for memory profiling (default: random)

    def dummy_rows(self, n: int) -> torch.Tensor:
        if self.dummy is not None:
            return self.dummy(n)
        if self.dtype.is_floating_point:
            return torch.rand(n, *self.shape, dtype=self.dtype)
        return torch.zeros(n, *self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class ExtraInputRows:
    """What a model's forward receives for one input: the rows a step feeds, and where they go."""

    index: torch.Tensor  # [k] int64: rows of the step's flat token batch that hold this input's placeholders
    values: torch.Tensor  # [k, *shape]


@dataclass(frozen=True)
class RequestExtraInputs:
    """A request's validated extra inputs, on the host."""

    positions: dict[str, list[int]]  # name -> prompt positions of its placeholders, ascending
    values: dict[str, torch.Tensor]  # name -> [len(positions), *shape]
    block_keys: tuple[bytes | None, ...]  # per prompt block: digest of the rows inside it (None: no rows)


def extra_input_specs(model: Any) -> dict[str, ExtraInputSpec]:
    return getattr(model, "extra_input_specs", None) or {}


def prepare_extra_inputs(
    specs: dict[str, ExtraInputSpec], prompt: Any, token_ids: list[int], block_size: int
) -> RequestExtraInputs | None:
    """Check a prompt's `extra_inputs` against the model's specs; None when it carries none."""
    given = prompt.get("extra_inputs") if isinstance(prompt, dict) else None
    if given is not None and not isinstance(given, dict):
        raise ExtraInputError(f"extra_inputs must be a dict of name -> tensor, got {type(given).__name__}")
    given = given or {}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        takes = f"takes {sorted(specs)}" if specs else "takes no extra inputs"
        raise ExtraInputError(f"extra_inputs {unknown} are unknown: this model {takes}")
    ids = np.asarray(token_ids)
    positions: dict[str, list[int]] = {}
    values: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        where = np.flatnonzero(ids == spec.placeholder_token_id).tolist()
        value = given.get(name)
        expected = (len(where), *spec.shape)
        if value is None:
            if where:
                raise ExtraInputError(
                    f"the prompt has {len(where)} placeholder tokens ({spec.placeholder_token_id}) of {name!r} but "
                    f"no extra_inputs[{name!r}]: give a {spec.dtype} tensor of shape {expected}"
                )
            continue
        if not isinstance(value, torch.Tensor):
            raise ExtraInputError(f"extra_inputs[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != spec.dtype:
            raise ExtraInputError(f"extra_inputs[{name!r}] has dtype {value.dtype}, the model takes {spec.dtype}")
        if tuple(value.shape) != expected:
            raise ExtraInputError(
                f"extra_inputs[{name!r}] has shape {tuple(value.shape)}, expected {expected}: one row of shape "
                f"{spec.shape} for each of the prompt's {len(where)} placeholder tokens ({spec.placeholder_token_id})"
            )
        if where:
            positions[name] = where
            values[name] = value.detach().to("cpu").contiguous()
    if not values:
        return None
    return RequestExtraInputs(positions, values, _block_keys(positions, values, len(token_ids), block_size))


def _block_keys(
    positions: dict[str, list[int]], values: dict[str, torch.Tensor], num_tokens: int, block_size: int
) -> tuple[bytes | None, ...]:
    """SHA-256 of every row inside each block (with the input's name, dtype and row shape): equal rows give
    equal keys, and a collision between different rows is as unlikely as any SHA-256 collision."""
    hashers: list[Any] = [None] * -(-num_tokens // block_size)
    for name in sorted(values):
        pos, rows = positions[name], values[name]
        raw = rows.reshape(len(pos), -1).view(torch.uint8).numpy()  # the bytes of each row
        header = f"{name}|{rows.dtype}|{tuple(rows.shape[1:])}|".encode()
        for block in sorted({p // block_size for p in pos}):
            lo = bisect.bisect_left(pos, block * block_size)
            hi = bisect.bisect_left(pos, (block + 1) * block_size)
            hasher = hashers[block] = hashers[block] or hashlib.sha256()
            hasher.update(header + f"{[p % block_size for p in pos[lo:hi]]}|".encode())
            hasher.update(raw[lo:hi].tobytes())
    return tuple(h.digest() if h is not None else None for h in hashers)


def step_extra_inputs(model: Any, batch: ScheduledBatch, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for `model.forward`: the extra-input rows this step feeds, or {} when there are none
    (and always for models that declare no extra inputs)."""
    if not extra_input_specs(model):
        return {}
    index: dict[str, list[int]] = {}
    parts: dict[str, list[torch.Tensor]] = {}
    start = 0  # where each sequence's tokens begin in the flat batch
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        extra: RequestExtraInputs | None = seq.extra_inputs
        if extra is not None:
            begin = seq.num_computed_tokens
            for name, pos in extra.positions.items():
                lo, hi = bisect.bisect_left(pos, begin), bisect.bisect_left(pos, begin + n)
                if hi > lo:
                    index.setdefault(name, []).extend(start + p - begin for p in pos[lo:hi])
                    parts.setdefault(name, []).append(extra.values[name][lo:hi])
        start += n
    if not index:
        return {}
    rows = {
        name: ExtraInputRows(torch.tensor(index[name], device=device), torch.cat(parts[name]).to(device))
        for name in index
    }
    return {"extra_inputs": rows}


def dummy_extra_inputs(model: Any, num_tokens: int, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for a profiling forward of `num_tokens` tokens: every token carries a dummy row of
    one of the model's inputs (taken in turn), so the profiled peak includes embedding them."""
    specs = extra_input_specs(model)
    if not specs or num_tokens == 0:
        return {}
    rows = {}
    for k, (name, spec) in enumerate(specs.items()):
        index = torch.arange(k, num_tokens, len(specs), device=device)
        if len(index):
            rows[name] = ExtraInputRows(index, spec.dummy_rows(len(index)).to(device))
    return {"extra_inputs": rows}


def extra_inputs_to(extra: dict[str, Any] | None, device: torch.device) -> dict[str, Any] | None:
    """`step_extra_inputs`' result on `device` (a tensor parallel step ships it from the host to every rank)."""
    if not extra:
        return extra
    rows = extra["extra_inputs"]
    return {"extra_inputs": {n: ExtraInputRows(r.index.to(device), r.values.to(device)) for n, r in rows.items()}}

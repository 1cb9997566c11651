"""A checkpoint's own 4-bit weights kept beside the dense ones, for the CPU's decode steps.

A decode step of a few sequences reads every weight to use it a few times: on a CPU its time is the bytes
read. A GGUF file already holds most matrices in 4 bits (Q4_0 / Q4_1, and Q8_0 as two 4-bit terms:
kernels/int4_matmul.py), so the linear layers keep that copy too, packed for torch's int4 kernel (about
a sixth of the fp32 bytes), and each step picks one by its number of rows (`int4_or_dense_linear`):

    rows <= max_rows   y = int4_matmul(x, layer.int4)    decode of a few sequences: the bytes read count
    more rows          y = x @ layer.weight.T (dense)    prefill, big batches: the GEMM's arithmetic does

The loader calls `attach_int4` after the dense weights are in, on the CPU platform's word (platforms/cpu.py:
whether the kernel pays here, and `max_rows`). Checkpoint names map to layers as in `load_weights` (q|k|v
and gate|up stacked; a tied LM head is the embedding). Only at tensor parallel size 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from miniengine.kernels.int4_matmul import Int4Rows, Int4Weight


def attach_int4(model: nn.Module, weights: Iterable[tuple[str, Int4Rows]], max_rows: int) -> int:
    """Give each linear layer (and the LM head) whose checkpoint matrices are all 4-bit its `int4` copy;
    returns the bytes the copies take."""
    stacked = getattr(model, "stacked_params", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    parts: dict[str, dict[int, Int4Rows]] = {}
    for name, rows in weights:
        module_name, _, leaf = name.rpartition(".")
        parent, _, proj = module_name.rpartition(".")
        if leaf != "weight":
            continue
        if proj in stacked:
            module_name, shard = f"{parent}.{stacked[proj][0]}", stacked[proj][1]
        else:
            shard = 0
        if module_name == "model.embed_tokens" and tied:
            module_name = "lm_head"
        parts.setdefault(module_name, {})[shard] = rows
    modules = dict(model.named_modules())
    total = 0
    for module_name, shards in parts.items():
        layer = modules.get(module_name)
        wanted = list(range(len(getattr(layer, "output_sizes", [layer]))))
        if not hasattr(layer, "int4") or sorted(shards) != wanted or len({r.repeat for r in shards.values()}) > 1:
            continue  # not a layer that takes a 4-bit copy, or not all its projections are 4-bit alike
        rows = Int4Rows.cat([shards[i] for i in wanted])
        if rows.q.shape[0] != layer.weight.shape[0] or rows.q.shape[1] != rows.repeat * layer.weight.shape[1]:
            continue
        layer.int4 = Int4Weight.pack(rows, max_rows)
        total += layer.int4.nbytes
    return total

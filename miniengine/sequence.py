"""A sequence: one stream of tokens being generated, and where its KV cache lives.

A request asks for `n` samples of a prompt; each sample is one `Sequence`. The scheduler moves sequences
between WAITING and RUNNING; the block manager fills `block_table`; the engine appends sampled tokens.

    token_ids:       [ p0 p1 p2 p3 p4 p5 | o0 o1 ]     prompt, then output tokens
    computed:        [ ################# |  #    ]     num_computed_tokens = 7: their K/V are in the cache
    next step feeds: o1 (one decode token); a prompt not yet computed is fed in chunks instead

Plain Python: no torch, so the scheduler and block manager can be read and tested alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from miniengine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    # A sibling of an n>1 request waits until the first sample's prompt is in the KV cache, then shares its
    # full prompt blocks through the prefix cache instead of computing them again.
    first_sibling: Sequence | None = None
    # Tensors the model merges at placeholder tokens, with each prompt block's digest of them
    # (a RequestExtraInputs: extra_inputs.py); None for plain token prompts.
    extra_inputs: Any = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are already in the cache
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied at first schedule (not after a preemption)
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    def extra_key(self, block: int) -> bytes | None:
        """Digest of the extra-input rows inside block number `block` (part of its prefix-cache key), or None."""
        keys = self.extra_inputs.block_keys if self.extra_inputs is not None else ()
        return keys[block] if block < len(keys) else None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def waits_for_sibling(self) -> bool:
        first = self.first_sibling
        return (
            first is not None
            and first.status is SequenceStatus.RUNNING
            and first.num_computed_tokens < first.num_prompt_tokens
        )

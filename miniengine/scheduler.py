"""The scheduler: which sequences run in the next step, and how many of their tokens (continuous batching).

Every step has a budget of `max_num_batched_tokens`. A sequence asks for the tokens it has not computed:
one for a decode, the rest of the prompt for a prefill. The scheduler hands the budget out in order

    1. running decodes           (one token each: keeps every stream moving)
    2. running prefills          (a chunk each: a long prompt is spread over several steps)
    3. waiting sequences, FCFS   (a prefix-cache hit skips the shared blocks; the first chunk is taken)

so one step can mix decodes with chunks of several prefills, and the model runner sees one flat batch.
When the KV cache cannot hold a running sequence's next tokens, the newest unscheduled running sequence is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later (its
full blocks usually come straight back from the prefix cache). Never a crash, never a lost request.

Plain Python: no torch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from miniengine.block_manager import BlockManager
from miniengine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens of each sequence fed this step
    preempted: list[Sequence] = field(default_factory=list)
    num_prompt_tokens: int = 0  # of the tokens fed, those that are prompt (prefill), for the step statistics

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.num_prompt_tokens += max(
            0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens) - seq.num_computed_tokens
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """True when sequence i reaches its last token this step, so a new token is sampled for it."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order: the last is the first to be preempted
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._make_room(seq, n, batch):
                batch.add(seq, n)
                budget -= n
        if batch.preempted:  # the cache is full: let running sequences drain before admitting new ones
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.waits_for_sibling:
                break
            cached = self.block_manager.lookup_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate(seq, n, cached):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Allocate blocks for `seq`, preempting the newest unscheduled running sequences if needed."""
        while not self.block_manager.allocate(seq, n):
            victim = next(s for s in reversed(self.running) if s not in batch.seqs)
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def step_done(self, batch: ScheduledBatch) -> None:
        """The model has written the K/V of the scheduled tokens: count them and publish full blocks."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (stopped, length or abort), wherever it is, and return its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

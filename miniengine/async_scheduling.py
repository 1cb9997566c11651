"""Async scheduling: launch step N+1 before reading step N's tokens, so the host's work hides behind the GPU.

A synchronous step leaves the GPU idle while the host appends tokens, detokenizes, checks stops, schedules
and prepares the next batch. Here the sampled ids of step N stay on the device and are copied there into
step N+1's input ids, so the host queues step N+1 first and then does step N's bookkeeping while it runs:

    sync    host  [sched N][prep N] wait N [append N, stops, outputs][sched N+1][prep N+1] wait N+1 ...
            GPU                    [ N ]                                                 [ N+1 ]
    async   host  [sched N+1][prep N+1] wait N [append N, stops, outputs][sched N+2][prep N+2] wait N+1 ...
            GPU   [      N      ][          N+1           ][           N+2           ]

(Not to be confused with `AsyncEngine`, which runs the engine loop for asyncio.)

Until its id is read, a sequence that sampled at step N carries `PLACEHOLDER` as its last token, so the
scheduler sees an ordinary decode and the runner feeds that row from the device. Each `step()`:

    1. settle the last launch: its tokens count as computed (publishing full blocks to the prefix cache,
       whose keys are all real tokens by now), and each of its sequences still running gets a placeholder
    2. schedule and launch the next batch (rows with placeholders take the last launch's ids on the device)
    3. read the last launch's ids (the one wait), swap them in for the placeholders, hand them to the engine

A sequence that the engine then finds finished (a stop, max_tokens, an abort) was scheduled once more than
it needed: that step's token is dropped at its settle, and its blocks were freed when it finished (the
device still writes that step's K/V into them first: the stream keeps the order). Sampling with penalties
reads every earlier token on the host, so a step that samples one of those waits for the ids first.
"""

from __future__ import annotations

from miniengine.model_runner import Launched, ModelRunner
from miniengine.sampler import Sampler, SampleResult
from miniengine.scheduler import ScheduledBatch, Scheduler
from miniengine.sequence import Sequence

PLACEHOLDER = -1  # a token id no model has: fed as is, it fails loudly in the embedding


class AsyncScheduling:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, sampler: Sampler) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.sampler = sampler
        self.batch: ScheduledBatch | None = None  # launched, its tokens not yet counted as computed
        self.launched: Launched | None = None  # its samples, still on the way
        self.waiting_ids: list[tuple[Sequence, int]] = []  # sequences holding a placeholder, and their row

    def step(self) -> tuple[ScheduledBatch, list[tuple[Sequence, SampleResult]]]:
        """Launch the next batch; returns it with the tokens of the one before (what the engine appends)."""
        self._settle()
        if any(seq.params.penalised for seq, _ in self.waiting_ids):
            return ScheduledBatch(), self._read(self.launched)  # a step that only reads: the next has real tokens
        batch = self.scheduler.schedule()
        fed = self.launched if self.waiting_ids else None
        self.launched = self.runner.launch(batch, self.sampler, fed) if batch.seqs else None
        self.batch = batch
        return batch, self._read(fed)

    def _settle(self) -> None:
        batch, self.batch = self.batch, None
        if batch is None:
            return
        live = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens) if not seq.is_finished]
        self.scheduler.step_done(ScheduledBatch([s for s, _ in live], [n for _, n in live]))
        if self.launched is not None:
            self.waiting_ids = [(seq, row) for row, seq in enumerate(self.launched.seqs) if not seq.is_finished]
            for seq, _ in self.waiting_ids:
                seq.token_ids.append(PLACEHOLDER)

    def _read(self, launched: Launched | None) -> list[tuple[Sequence, SampleResult]]:
        """Wait for the ids of `launched` that placeholders stand for and put them in their place."""
        if not self.waiting_ids:
            return []
        assert launched is not None
        results = launched.sampled.results()
        sampled = []
        for seq, row in self.waiting_ids:
            placeholder = seq.token_ids.pop()
            assert placeholder == PLACEHOLDER, "a placeholder was overwritten before its id was read"
            sampled.append((seq, results[row]))
        self.waiting_ids = []
        return sampled

"""The sampler: turn each sequence's logits into its next token, following its own SamplingParams.

    logits -> penalties (repetition, presence, frequency) -> min_tokens (hide EOS and stop ids)
           -> greedy rows: argmax
           -> other rows: / temperature -> top-k -> top-p -> min-p -> softmax -> draw

The draw uses the "exponential race": argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
Each seeded sequence draws its E from its own torch.Generator, so its tokens do not depend on what else is
in the batch; unseeded sequences share the engine's generator.

Everything runs where the logits are (the GPU, on CUDA). Which filters a step needs is decided from the
requests' parameters on the host, never by looking at device values, and the sampled ids and log-probs
come back in one transfer: the one point per step where the host waits for the device. `sample` starts
that transfer and returns; `Sampled.results()` waits for it (async scheduling launches the next step
in between: async_scheduling.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from miniengine.sequence import Sequence


@dataclass(slots=True)
class SampleResult:
    token_id: int
    # token id -> log-probability under the model (before penalties and temperature): the sampled token
    # and the top-N, when the request asked for logprobs=N
    logprobs: dict[int, float] | None = None


@dataclass(slots=True)
class Sampled:
    """One step's samples: the token ids where the logits are, and their copy to the host under way."""

    token_ids: torch.Tensor  # [N] on the device: async scheduling feeds them to the next step there
    copy: HostCopy  # the ids, or (with log-probs) rows of [id, its log-prob, top-N ids, top-N log-probs]
    num_logprobs: list[int | None]  # what each row asked for

    def results(self) -> list[SampleResult]:
        """Wait for the copy: one SampleResult per row."""
        host = self.copy.wait()
        if not any(n is not None for n in self.num_logprobs):
            return [SampleResult(t) for t in host.tolist()]
        top = max(n or 0 for n in self.num_logprobs)
        results = []
        for row, n in zip(host.tolist(), self.num_logprobs):
            token = int(row[0])
            logprobs = None
            if n is not None:
                logprobs = {token: row[1]}
                logprobs.update(zip(map(int, row[2 : 2 + n]), row[2 + top : 2 + top + n]))
            results.append(SampleResult(token, logprobs))
        return results


class Sampler:
    def __init__(self, eos_token_ids: set[int], device: torch.device, seed: int) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self.seq_generators.pop(seq.seq_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        return self.sample(logits, seqs).results()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> Sampled:
        """Sample every row, and start copying the ids (and log-probs) to the host: nothing waits yet."""
        num_logprobs = [s.params.logprobs for s in seqs]
        if all(_plain_greedy(s) for s in seqs):  # the common case in one op: the argmax of the model's logits
            token_ids = logits.argmax(dim=-1)
            return Sampled(token_ids, HostCopy(token_ids), num_logprobs)
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in num_logprobs) else None
        logits = self._apply_penalties(logits, seqs)
        logits = self._hide_stop_tokens(logits, seqs)
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            rows = to_device(random_rows, logits.device)
            token_ids[rows] = self._draw(logits[rows], [seqs[i] for i in random_rows])
        if raw_logprobs is None:
            return Sampled(token_ids, HostCopy(token_ids), num_logprobs)
        # One transfer: ids, the sampled token's log-prob and the top-N, as float64 (exact for token ids).
        top = max(n or 0 for n in num_logprobs)
        values, ids = raw_logprobs.topk(top, dim=-1) if top else (logits[:, :0], token_ids[:, None][:, :0])
        chosen = raw_logprobs.gather(1, token_ids[:, None])
        packed = torch.cat([token_ids[:, None].double(), chosen.double(), ids.double(), values.double()], dim=1)
        return Sampled(token_ids, HostCopy(packed), num_logprobs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        p = [s.params for s in seqs]
        if not any(x.penalised for x in p):
            return logits
        vocab, device = logits.shape[1], logits.device

        def flat(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            """(row, token) index pairs of every token of every list, tokens past the vocabulary dropped."""
            rows = np.repeat(np.arange(len(token_lists)), [len(t) for t in token_lists])
            tokens = np.fromiter(itertools.chain.from_iterable(token_lists), np.int64, len(rows))
            keep = tokens < vocab
            return to_device(rows[keep], device), to_device(tokens[keep], device)

        counts = torch.zeros_like(logits)  # occurrences of each token in the output so far
        out_rows, out_tokens = flat([s.output_token_ids for s in seqs])
        counts.index_put_((out_rows, out_tokens), torch.ones_like(out_tokens, dtype=logits.dtype), accumulate=True)
        seen = torch.zeros_like(logits, dtype=torch.bool)  # in prompt or output
        seen[flat([s.token_ids for s in seqs])] = True
        rep = to_device([x.repetition_penalty for x in p], device, torch.float32)[:, None]
        # HF's rule: shrink a seen token's logit towards "less likely" whichever its sign.
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        freq = to_device([x.frequency_penalty for x in p], device, torch.float32)[:, None]
        pres = to_device([x.presence_penalty for x in p], device, torch.float32)[:, None]
        return logits - freq * counts - pres * (counts > 0).to(logits.dtype)

    def _hide_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows, tokens = [], []
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                hidden = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else self.eos_token_ids)
                kept = [t for t in hidden if t < logits.shape[1]]
                rows += [i] * len(kept)
                tokens += kept
        if rows:
            logits[to_device(rows, logits.device), to_device(tokens, logits.device)] = -torch.inf
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[1]
        params = [s.params for s in seqs]
        logits = logits / to_device([p.temperature for p in params], device, torch.float32)[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        if any(k < vocab for k in top_k) or any(p.top_p < 1 for p in params):
            top_p = to_device([p.top_p for p in params], device, torch.float32)
            logits = _top_k_top_p(logits, to_device(top_k, device), top_p)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], device, torch.float32)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0)
        race = torch.empty_like(probs)
        shared = [i for i, p in enumerate(params) if p.seed is None]
        if shared:  # unseeded rows draw together from the engine's generator
            draws = torch.empty(len(shared), vocab, device=device).exponential_(generator=self.generator)
            race[to_device(shared, device)] = draws
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                race[i].exponential_(generator=self._generator(seq))
        return (probs / race).argmax(dim=-1)

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = self.seq_generators.get(seq.seq_id)
        if gen is None:
            # The n samples of one seeded request must differ from each other, reproducibly.
            seed = hash((seq.params.seed, seq.index)) & (2**63 - 1)
            gen = self.seq_generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy, with nothing that changes the logits first (penalties, stop tokens held back) or reads them."""
    p = seq.params
    return p.greedy and p.logprobs is None and not p.penalised and seq.num_output_tokens >= p.min_tokens


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and outside the smallest set with mass >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens; the best is always kept
    drop |= mass_before >= top_p[:, None]
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def to_device(values: list | np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small host list or array on `device`, without waiting for the device: a plain copy from pageable
    memory to a GPU first waits for all the work queued there, which would undo async scheduling's overlap."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy to the host, started now and waited for by `wait()`: the step's one
    device-to-host copy. On CUDA the host waits on an event, which releases the GIL, so another thread (a
    server's HTTP loop) runs while the GPU finishes the step; `.tolist()` on a CUDA tensor would hold the
    GIL for the whole wait."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.done: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self.host = tensor.cpu()
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host

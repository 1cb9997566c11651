"""The sampler: turn each sequence's logits into its next token, following its own SamplingParams.

    logits -> penalties (repetition, presence, frequency) -> min_tokens (hide EOS and stop ids)
           -> greedy rows: argmax
           -> other rows: / temperature -> top-k -> top-p -> min-p -> softmax -> draw

The draw uses the "exponential race": argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
Each seeded sequence draws its E from its own torch.Generator, so its tokens do not depend on what else is
in the batch; unseeded sequences share the engine's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miniengine.sequence import Sequence


@dataclass(slots=True)
class SampleResult:
    token_id: int
    # token id -> log-probability under the model (before penalties and temperature): the sampled token
    # and the top-N, when the request asked for logprobs=N
    logprobs: dict[int, float] | None = None


class Sampler:
    def __init__(self, eos_token_ids: set[int], device: torch.device, seed: int) -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq: Sequence) -> None:
        self.seq_generators.pop(seq.seq_id, None)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = self._apply_penalties(logits, seqs)
        logits = self._hide_stop_tokens(logits, seqs)
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            token_ids[rows] = self._draw(logits[rows], [seqs[i] for i in random_rows])
        token_list = token_ids.tolist()
        results = [SampleResult(t) for t in token_list]
        if raw_logprobs is not None:
            for i, seq in enumerate(seqs):
                if seq.params.logprobs is not None:
                    results[i].logprobs = _top_logprobs(raw_logprobs[i], token_list[i], seq.params.logprobs)
        return results

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        p = [s.params for s in seqs]
        if all(x.repetition_penalty == 1 and x.presence_penalty == 0 and x.frequency_penalty == 0 for x in p):
            return logits
        vocab = logits.shape[1]
        counts = torch.zeros_like(logits)  # occurrences of each token in the output so far
        seen = torch.zeros_like(logits, dtype=torch.bool)  # in prompt or output
        for i, seq in enumerate(seqs):
            out = torch.tensor([t for t in seq.output_token_ids if t < vocab], dtype=torch.long, device=logits.device)
            counts[i].index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            seen[i, [t for t in seq.token_ids if t < vocab]] = True
        rep = torch.tensor([x.repetition_penalty for x in p], device=logits.device)[:, None]
        # HF's rule: shrink a seen token's logit towards "less likely" whichever its sign.
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        freq = torch.tensor([x.frequency_penalty for x in p], device=logits.device)[:, None]
        pres = torch.tensor([x.presence_penalty for x in p], device=logits.device)[:, None]
        return logits - freq * counts - pres * (counts > 0).to(logits.dtype)

    def _hide_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                hidden = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else self.eos_token_ids)
                logits[i, [t for t in hidden if t < logits.shape[1]]] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        logits = logits / torch.tensor([s.params.temperature for s in seqs], device=device)[:, None]
        top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else logits.shape[1] for s in seqs], device=device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
        if (top_k < logits.shape[1]).any() or (top_p < 1).any():
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
        if (min_p > 0).any():
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0)
        race = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            race[i].exponential_(generator=self._generator(seq))
        return (probs / race).argmax(dim=-1)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        gen = self.seq_generators.get(seq.seq_id)
        if gen is None:
            # The n samples of one seeded request must differ from each other, reproducibly.
            seed = hash((seq.params.seed, seq.index)) & (2**63 - 1)
            gen = self.seq_generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return gen


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and outside the smallest set with mass >= top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens; the best is always kept
    drop |= mass_before >= top_p[:, None]
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _top_logprobs(logprobs: torch.Tensor, token_id: int, n: int) -> dict[int, float]:
    out = {token_id: logprobs[token_id].item()}
    if n > 0:
        values, ids = logprobs.topk(n)
        out.update(zip(ids.tolist(), values.tolist()))
    return out

"""The sampler against the definitions of its filters, on random logits (no model needed)."""

from __future__ import annotations

import pytest
import torch

from miniengine.outputs import TextState
from miniengine.sampler import Sampler, _top_k_top_p
from miniengine.sampling_params import SamplingParams
from miniengine.sequence import Sequence

VOCAB = 50


def seq(params: SamplingParams, tokens=(1, 2, 3), seq_id: int = 0, index: int = 0) -> Sequence:
    return Sequence(seq_id, str(seq_id), list(tokens), params, index)


def sampler() -> Sampler:
    return Sampler({0}, torch.device("cpu"), seed=0)


def draw_counts(params: SamplingParams, logits: torch.Tensor, draws: int = 4000) -> torch.Tensor:
    s = sampler()
    seqs = [seq(params, seq_id=i) for i in range(draws)]
    tokens = [r.token_id for r in s(logits.expand(draws, -1).clone(), seqs)]
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float()


def test_greedy_is_argmax():
    logits = torch.randn(4, VOCAB)
    results = sampler()(logits, [seq(SamplingParams(temperature=0), seq_id=i) for i in range(4)])
    assert [r.token_id for r in results] == logits.argmax(-1).tolist()


def test_top_k_top_p_keep_exactly_the_defined_sets():
    logits = torch.randn(3, VOCAB)
    top_k = torch.tensor([5, VOCAB, 1])
    top_p = torch.tensor([1.0, 0.5, 1.0])
    kept = _top_k_top_p(logits, top_k, top_p).isfinite()
    assert kept[0].sum() == 5 and set(kept[0].nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
    assert kept[2].sum() == 1 and kept[2, logits[2].argmax()]
    probs, order = logits[1].softmax(-1).sort(descending=True)
    n = int((probs.cumsum(0) < 0.5).sum()) + 1  # the smallest prefix with mass >= 0.5
    assert set(kept[1].nonzero().flatten().tolist()) == set(order[:n].tolist())


def test_sampling_follows_the_distribution():
    logits = torch.randn(1, 8)
    counts = draw_counts(SamplingParams(temperature=1.0), logits)
    assert torch.allclose(counts / counts.sum(), logits.softmax(-1)[0], atol=0.03)


def test_temperature_top_k_and_min_p_restrict_support():
    logits = torch.randn(1, 20)
    assert (draw_counts(SamplingParams(temperature=1.0, top_k=3), logits, 500).nonzero().numel()) <= 3
    probs = logits.softmax(-1)[0]
    counts = draw_counts(SamplingParams(temperature=1.0, min_p=0.5), logits, 500)
    assert set(counts.nonzero().flatten().tolist()) <= set((probs >= 0.5 * probs.max()).nonzero().flatten().tolist())


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, VOCAB)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sampler()(logits[1:2], [seq(params, seq_id=7)])[0].token_id for _ in range(1)]
    other = SamplingParams(temperature=1.0)
    batch = sampler()(logits, [seq(other, seq_id=1), seq(params, seq_id=7), seq(other, seq_id=3)])
    assert batch[1].token_id == alone[0]
    # successive draws of one seeded sequence follow its own generator: the same in any company
    s1, s2 = sampler(), sampler()
    a = [s1(logits[1:2], [seq(params, seq_id=7)])[0].token_id for _ in range(20)]
    b = [s2(logits, [seq(other, seq_id=1), seq(params, seq_id=7), seq(other, seq_id=3)])[1].token_id for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_penalties():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6] = 2.0, 1.9
    # token 5 already in the output: a repetition penalty of 2 halves its logit, so 6 wins
    tokens = [1, 2, 5]
    s = seq(SamplingParams(temperature=0, repetition_penalty=2.0), tokens=tokens)
    s.num_prompt_tokens = 2
    assert sampler()(logits.clone(), [s])[0].token_id == 6
    s = seq(SamplingParams(temperature=0, frequency_penalty=0.5), tokens=tokens)
    s.num_prompt_tokens = 2
    assert sampler()(logits.clone(), [s])[0].token_id == 6
    s = seq(SamplingParams(temperature=0, presence_penalty=0.2), tokens=tokens)
    s.num_prompt_tokens = 2
    assert sampler()(logits.clone(), [s])[0].token_id == 6
    s = seq(SamplingParams(temperature=0, presence_penalty=0.2), tokens=tokens)  # 5 only in the prompt
    s.num_prompt_tokens = 3
    assert sampler()(logits.clone(), [s])[0].token_id == 5


def test_min_tokens_hides_eos_and_stop_ids():
    logits = torch.zeros(1, VOCAB)
    logits[0, 0], logits[0, 9], logits[0, 4] = 5.0, 4.0, 1.0  # eos (0) and a stop id (9) lead
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[9])
    assert sampler()(logits.clone(), [seq(params)])[0].token_id == 4
    done = seq(params, tokens=[1, 2, 3])
    done.num_prompt_tokens = 1  # two outputs already: EOS is allowed again
    assert sampler()(logits.clone(), [done])[0].token_id == 0


def test_logprobs_are_the_model_distribution():
    logits = torch.randn(1, VOCAB)
    result = sampler()(logits, [seq(SamplingParams(temperature=0.5, logprobs=2))])[0]
    expected = logits.log_softmax(-1)[0]
    assert result.token_id in result.logprobs and len(result.logprobs) in (2, 3)
    for token, value in result.logprobs.items():
        assert value == pytest.approx(expected[token].item(), abs=1e-5)


class _Chars:
    """A stand-in detokenizer: token i is the i-th character of a text."""

    def __init__(self, text: str) -> None:
        self.text = text

    def step(self, token_id: int) -> str:
        return self.text[token_id]


def test_stop_string_across_tokens_is_cut_and_held_back():
    text = "hello world, goodbye"
    state = TextState(_Chars(text), stop=["world", "goodbye!"])  # type: ignore[arg-type]
    shown = []
    for i in range(len(text)):
        if state.add_token(i):
            break
        shown.append(state.visible_text(finished=False))
    assert state.text == "hello " and state.stop_reason == "world"
    assert all(not s.endswith("w") and "world" not in s for s in shown)
    assert all(a == b[: len(a)] for a, b in zip(shown, shown[1:]))  # what was shown is never taken back

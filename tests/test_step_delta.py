"""One StepDelta per engine step (output_processor.py): rows (sequence id, token id) in two arrays, the rare
news beside them. It crosses the engine process's pipe unchanged (to_wire / from_wire: random deltas, every
rare field); the output processor turns synthetic deltas into the outputs their meaning asks for (n=2, a
stop token's hidden text, a stop string's Finish, tokens past a stop dropped, an abort without a token,
logprobs in row order); and on a real engine run (aborts mid-run, one before its first token, n>1, logprobs,
stop strings and stop ids, min_tokens) the front end's loop over the wire gives the engine's own `step()`
outputs, output for output, each final one equal to what the engine's sequences hold."""

from __future__ import annotations

import pickle
import random
from array import array

import pytest

from miniengine import Engine, SamplingParams
from miniengine.engine_process import from_wire, to_wire
from miniengine.loader import open_checkpoint
from miniengine.output_processor import OutputProcessor, StepDelta


def random_delta(rng: random.Random) -> StepDelta:
    rows = rng.randrange(1, 300)
    seq_ids = array("q", rng.sample(range(2**40), rows))  # ids of a long-running server, past 32 bits
    token_ids = array("i", [rng.randrange(2**31) for _ in range(rows)])
    params = SamplingParams(temperature=0.7, n=2, seed=rng.randrange(100), stop=["\n"], logprobs=2)
    started = [(f"r{rng.randrange(100)}", rng.choice([None, "héllo"]), [rng.randrange(5000) for _ in range(9)],
                params, seq_ids[0], 16)]  # fmt: skip
    finished = {seq_ids[-1]: ("length", None), rng.randrange(2**40): ("abort", None), seq_ids[0]: ("stop", 2)}
    logprobs = {row: {int(token_ids[row]): -rng.random(), 7: -3.5} for row in rng.sample(range(rows), rows // 2)}
    return StepDelta(seq_ids, token_ids, started, finished, logprobs, ["r1", "r2"])


def test_a_delta_crosses_the_wire_unchanged():
    rng = random.Random(0)
    for _ in range(20):
        delta = random_delta(rng)
        back = from_wire(pickle.loads(pickle.dumps(to_wire(delta), pickle.HIGHEST_PROTOCOL)))
        for name in StepDelta.__slots__:
            assert getattr(back, name) == getattr(delta, name), name
        assert (back.seq_ids.typecode, back.token_ids.typecode) == ("q", "i")
    empty = from_wire(pickle.loads(pickle.dumps(to_wire(StepDelta()))))
    assert len(empty.seq_ids) == len(empty.token_ids) == 0 and not (empty.started or empty.finished)
    # The common step is rows only: a few bytes per token, not a tuple per request.
    delta = StepDelta(array("q", range(256)), array("i", range(1000, 1256)))
    assert len(pickle.dumps(to_wire(delta), pickle.HIGHEST_PROTOCOL)) < 256 * 12 + 100


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return open_checkpoint(smollm2_path).tokenizer


def test_the_processor_reads_each_part_of_a_delta(tokenizer):
    encode = tokenizer.encode
    processor = OutputProcessor(tokenizer)
    prompt = encode("The weather today")
    pair = SamplingParams(n=2, temperature=1.0, logprobs=1, stop=[" rain"])
    single = SamplingParams(temperature=0, stop_token_ids=[13])
    words_a, words_b = encode(" is sunny and warm"), encode(" looks like rain later")
    start = [("pair", None, prompt, pair, 40, 0), ("one", "The weather today", prompt, single, 7, 16)]
    rows = [(40, words_a[0]), (41, words_b[0]), (7, words_a[0])]
    lps = {0: {words_a[0]: -0.5}, 1: {words_b[0]: -1.5}}
    delta = StepDelta(array("q", [s for s, _ in rows]), array("i", [t for _, t in rows]), start, {}, lps)
    outputs, stops = processor.process(delta)
    assert [o.request_id for o in outputs] == ["one", "pair"]  # arrival order: seq 7 came before seq 40
    one, both = outputs
    assert one.num_cached_tokens == 16 and one.prompt == "The weather today" and not one.finished
    assert [c.token_ids for c in both.outputs] == [[words_a[0]], [words_b[0]]]
    assert [c.logprobs for c in both.outputs] == [[lps[0]], [lps[1]]]
    # Sample 1 runs into its stop string; sample 0 goes on; "one" ends on its stop token id (13: hidden).
    rows = [(41, t) for t in words_b[1:]]
    delta = StepDelta(array("q", [s for s, _ in rows]), array("i", [t for _, t in rows]))
    delta.logprobs = {row: {t: -1.0} for row, (_, t) in enumerate(rows)}
    outputs, stops = processor.process(delta)
    assert stops == [("pair", 1)]
    (both,) = outputs
    stopped = both.outputs[1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " rain" and stopped.text == " looks like"
    assert len(stopped.logprobs) == len(stopped.token_ids) == words_b.index(encode(" rain")[0]) + 1
    late = StepDelta(array("q", [41, 40, 7]), array("i", [99, words_a[1], 13]), finished={7: ("stop", 13)})
    late.logprobs = {0: {99: -1.0}, 1: {words_a[1]: -0.1}}
    outputs, stops = processor.process(late)
    assert stops == [] and [o.request_id for o in outputs] == ["one", "pair"]
    one, both = outputs
    assert one.finished and one.outputs[0].token_ids == [words_a[0], 13] and one.outputs[0].stop_reason == 13
    assert one.outputs[0].text == tokenizer.decode([words_a[0]])  # the stop token's text is not shown
    assert both.outputs[1] == stopped  # the token past its stop string is dropped
    assert both.outputs[0].logprobs == [{words_a[0]: -0.5}, {words_a[1]: -0.1}]
    # An abort reported without a token ends the request; a quiet request reports only its final output.
    assert processor.process(StepDelta(array("q", [40]), array("i", [words_a[2]])), quiet={"pair"}) == ([], [])
    outputs, _ = processor.process(StepDelta(finished={40: ("abort", None)}), quiet={"pair"})
    assert outputs[0].finished and [c.finish_reason for c in outputs[0].outputs] == ["abort", "stop"]
    assert not processor._requests and not processor._samples


CASES = [  # greedy with stop strings, n=3 seeded with logprobs, stop ids with min_tokens, a long one to abort
    ("The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=[".", " is"])),
    ("Once upon a time", SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=9, logprobs=2)),
    ("List three colors:", SamplingParams(temperature=0, max_tokens=10, min_tokens=3, stop_token_ids=[28, 30])),
    ("Tell me a story.", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
    ("Count: 1, 2, 3,", SamplingParams(temperature=0.5, seed=3, n=2, max_tokens=14, logprobs=0, stop=["\n"])),
]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    # Room for three sequences at once: the rest wait, and one of them is aborted before its first token.
    engine = Engine(smollm2_path, device="cpu", num_kv_blocks=64, max_model_len=256, max_num_seqs=3, stat_loggers=[])
    yield engine
    engine.shutdown()


def test_the_front_end_over_the_wire_gives_the_engines_own_outputs(engine):
    processor = OutputProcessor(engine.tokenizer)

    def front_end_step() -> list:
        delta = from_wire(pickle.loads(pickle.dumps(to_wire(engine.step_deltas()))))
        outputs, stops = processor.process(delta)
        for request_id, index in stops:
            engine.finish_sample(request_id, index)
        return outputs

    runs, seqs = [], {}
    for step in (engine.step, front_end_step):
        engine.reset_prefix_cache()  # both runs compute every prompt
        for i, (prompt, params) in enumerate(CASES):
            engine.add_request(prompt, params, f"r{i}")
            seqs[f"r{i}"] = engine._requests[f"r{i}"].seqs
        engine.add_request("Never started", SamplingParams(max_tokens=5), "queued")
        outputs, steps = [], 0
        while engine.has_unfinished():
            outputs.append(step())
            steps += 1
            if steps == 3:
                engine.abort("r3")  # mid-run
                engine.abort("queued")  # still waiting for a place in the batch
        runs.append(outputs)
        finals = {out.request_id: out for out in sum(outputs, []) if out.finished}
        assert set(finals) == {*seqs, "queued"}
        for request_id, out in finals.items():
            for c in out.outputs if request_id != "queued" else ():
                seq = seqs[request_id][c.index]
                ids = seq.output_token_ids
                # Every token the engine sampled up to the end the caller saw (a stop string may end it a token
                # or two before the engine heard of it), its text the plain decode of those tokens.
                assert ids[: len(c.token_ids)] == c.token_ids and len(ids) <= len(c.token_ids) + 2
                shown = (
                    c.token_ids[:-1] if c.finish_reason == "stop" and isinstance(c.stop_reason, int) else c.token_ids
                )
                prompt = seq.prompt_token_ids
                full = engine.tokenizer.decode(prompt + shown)[len(engine.tokenizer.decode(prompt)) :]
                assert full.startswith(c.text) and (c.finish_reason != "length" or full == c.text)
                if isinstance(c.stop_reason, str):
                    assert full[len(c.text) :].startswith(c.stop_reason)
                if c.logprobs is not None:
                    assert len(c.logprobs) == len(c.token_ids) and all(
                        t in lp for t, lp in zip(c.token_ids, c.logprobs)
                    )
        assert [c.finish_reason for c in finals["r3"].outputs] == ["abort"]
        assert finals["queued"].outputs[0].token_ids == [] and finals["queued"].outputs[0].finish_reason == "abort"
        assert len({c.finish_reason for o in finals.values() for c in o.outputs}) == 3  # stop, length, abort
    assert runs[1] == runs[0]
    assert not processor._requests and not processor._samples and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

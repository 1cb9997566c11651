"""Extra per-request inputs: a Llama that merges "image" feature rows at placeholder tokens, checked against
transformers' own Llama fed the same merged `inputs_embeds`, under chunked prefill, preemption and prefix
hits; equal inputs share K/V blocks and different ones never do; bad inputs are rejected up front."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model
from torch import nn

from miniengine import Engine, ModelRegistry, SamplingParams
from miniengine.extra_inputs import (
    ExtraInputError,
    ExtraInputSpec,
    dummy_extra_inputs,
    prepare_extra_inputs,
    step_extra_inputs,
)
from miniengine.models.llama import LlamaForCausalLM
from miniengine.scheduler import ScheduledBatch
from miniengine.sequence import Sequence

IMAGE = 511  # the placeholder token (the tiny vocabulary's last id)
FEATURES = 6  # numbers per image row


class ImageLlama(LlamaForCausalLM):
    """A Llama whose placeholder tokens take a linear projection of an image feature row as embedding."""

    def __init__(self, config):
        super().__init__(config)
        self.image_proj = nn.Linear(FEATURES, config.hidden_size, bias=False)
        self.extra_input_specs = {"image": ExtraInputSpec(IMAGE, (FEATURES,), torch.float32)}

    def forward(self, input_ids, positions, extra_inputs=None):
        embeds = self.model.embed_tokens(input_ids)
        if extra_inputs:
            rows = extra_inputs["image"]
            embeds = embeds.index_copy(0, rows.index, self.image_proj(rows.values.to(embeds.dtype)))
        return self.model(input_ids, positions, embeds)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("image_llama"), "llama")
    weights = load_file(directory / "model.safetensors")
    weights["image_proj.weight"] = torch.randn(64, FEATURES, generator=torch.Generator().manual_seed(1)) * 0.5
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, architectures=["ImageLlamaForCausalLM"])))
    ModelRegistry.register_model("ImageLlamaForCausalLM", ImageLlama)
    return directory


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import LlamaForCausalLM as HFLlama

    model = HFLlama.from_pretrained(model_dir, dtype=torch.float32).eval()  # image_proj is left out
    proj = load_file(model_dir / "model.safetensors")["image_proj.weight"]
    return model, proj


def hf_greedy(hf_model, ids: list[int], image: torch.Tensor, max_tokens: int) -> list[int]:
    """transformers' greedy continuation, given the merged embeddings directly."""
    model, proj = hf_model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(torch.tensor(ids))
        embeds[torch.tensor(ids) == IMAGE] = image @ proj.T
        out = model.generate(
            inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, -max_tokens:].tolist()


def image_prompt(seed: int, layout: list[tuple[int, int]]) -> tuple[list[int], torch.Tensor]:
    """A prompt of (text tokens, image rows) runs; random text ids and random image rows."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for text, rows in layout:
        ids += torch.randint(1, IMAGE, (text,), generator=generator).tolist() + [IMAGE] * rows
    image = torch.randn(ids.count(IMAGE), FEATURES, generator=generator)
    return ids, image


def request(ids, image):
    return {"prompt_token_ids": ids, "extra_inputs": {"image": image}}


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
LAYOUTS = [[(3, 5), (6, 0)], [(1, 2), (7, 3), (4, 4), (2, 0)], [(9, 6), (3, 0)]]


def test_matches_transformers_under_chunked_prefill_and_preemption(model_dir, hf_model):
    prompts = [image_prompt(seed, layout) for seed, layout in enumerate(LAYOUTS)]
    want = [hf_greedy(hf_model, ids, image, GREEDY.max_tokens) for ids, image in prompts]
    # One step per prompt, plenty of room: the plain case.
    roomy = Engine(str(model_dir), num_kv_blocks=64, block_size=4)
    assert [o.outputs[0].token_ids for o in roomy.generate([request(*p) for p in prompts], GREEDY)] == want
    # Prompts fed in chunks of a few tokens, in a cache too small for all three: preempted and recomputed.
    tight = Engine(str(model_dir), num_kv_blocks=12, block_size=4, max_num_batched_tokens=6, max_num_seqs=3)
    outs = tight.generate([request(*p) for p in prompts], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert tight.scheduler.num_preemptions > 0


def test_prefix_cache_shares_blocks_of_equal_inputs_only(model_dir, hf_model):
    engine = Engine(str(model_dir), num_kv_blocks=64, block_size=4)
    bm = engine.block_manager
    ids, image = image_prompt(7, [(8, 4), (12, 0)])  # blocks 0-1 text, block 2 image rows, blocks 3-5 text
    other = image.clone()
    other[2, 0] += 1.0  # one number of one row differs
    first = engine.generate([request(ids, image)], GREEDY)[0]

    def lookup(img):
        seq = Sequence(-1, "probe", list(ids), GREEDY, extra_inputs=prepare_extra_inputs(
            engine.extra_input_specs, request(ids, img), ids, bm.block_size))  # fmt: skip
        return bm.lookup_prefix(seq)

    full_blocks = (len(ids) - 1) // bm.block_size
    assert len(lookup(image)) == full_blocks  # equal inputs: every full block is shared
    assert len(lookup(other)) == 2  # a different image row: only the text blocks before it
    assert lookup(other) == lookup(image)[:2]

    same = engine.generate([request(ids, image)], GREEDY)[0]
    assert same.num_cached_tokens == full_blocks * bm.block_size
    assert same.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy(hf_model, ids, image, 8)
    changed = engine.generate([request(ids, other)], GREEDY)[0]
    assert changed.num_cached_tokens == 2 * bm.block_size
    assert changed.outputs[0].token_ids == hf_greedy(hf_model, ids, other, 8)

    # Both at once, in one batch: equal token ids, so a shared block would be a bug.
    engine.reset_prefix_cache()
    both = engine.generate([request(ids, image), request(ids, other)], GREEDY)
    assert [o.outputs[0].token_ids for o in both] == [first.outputs[0].token_ids, changed.outputs[0].token_ids]
    assert sum(o.num_cached_tokens for o in both) == 0


def test_bad_extra_inputs_are_rejected_before_anything_is_allocated(model_dir):
    engine = Engine(str(model_dir), num_kv_blocks=16, block_size=4)
    ids, image = image_prompt(3, [(4, 3), (2, 0)])
    bad = [
        ({"image": image.double()}, "has dtype torch.float64, the model takes torch.float32"),
        ({"image": image[:2]}, r"has shape \(2, 6\), expected \(3, 6\)"),
        ({"image": image[:, :4]}, r"has shape \(3, 4\), expected \(3, 6\)"),
        ({}, r"3 placeholder tokens \(511\) of 'image' but no extra_inputs\['image'\]"),
        ({"image": image, "audio": image}, r"\['audio'\] are unknown: this model takes \['image'\]"),
        ({"image": image.tolist()}, "must be a torch.Tensor, got list"),
    ]
    for extra, message in bad:
        with pytest.raises(ExtraInputError, match=message):
            engine.add_request({"prompt_token_ids": ids, "extra_inputs": extra}, GREEDY)
    with pytest.raises(ExtraInputError, match="placeholder tokens"):
        engine.add_request(ids, GREEDY)  # a bare token list with placeholders
    with pytest.raises(ExtraInputError, match="must be a dict"):
        engine.add_request({"prompt_token_ids": ids, "extra_inputs": [image]}, GREEDY)
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    with pytest.raises(ExtraInputError, match="this model takes no extra inputs"):
        prepare_extra_inputs({}, {"prompt_token_ids": [1, 2], "extra_inputs": {"image": image}}, [1, 2], 4)


def test_each_step_gets_the_rows_of_the_positions_it_feeds():
    spec = {"image": ExtraInputSpec(IMAGE, (2,), torch.float32)}
    ids = [1, IMAGE, IMAGE, 2, 3, IMAGE, 4, IMAGE]  # rows 0..3 at positions 1, 2, 5, 7
    image = torch.arange(8, dtype=torch.float32).view(4, 2)
    extra = prepare_extra_inputs(spec, request(ids, image), ids, block_size=4)
    model = type("M", (), {"extra_input_specs": spec})()
    a = Sequence(0, "a", list(ids), GREEDY, extra_inputs=extra)
    b = Sequence(1, "b", [5, 6, 7], GREEDY)  # no extra inputs, between the two
    c = Sequence(2, "c", list(ids), GREEDY, extra_inputs=extra)
    a.num_computed_tokens, c.num_computed_tokens = 2, 5  # a: chunk 2..5 (rows 1, 2); c: 5..7 (rows 2, 3)
    batch = ScheduledBatch([a, b, c], [4, 3, 3])
    rows = step_extra_inputs(model, batch, torch.device("cpu"))["extra_inputs"]["image"]
    #                 a: positions 2, 5 at flat 0, 3;  c: positions 5, 7 at flat 7 + 0, 7 + 2
    assert rows.index.tolist() == [0, 3, 7, 9]
    assert rows.values.tolist() == image[[1, 2, 2, 3]].tolist()
    decode = ScheduledBatch([b], [1])  # nothing fed carries rows: the model is called without extra_inputs
    assert step_extra_inputs(model, decode, torch.device("cpu")) == {}
    assert step_extra_inputs(object(), batch, torch.device("cpu")) == {}  # a model without extra inputs
    # Block keys: blocks 0 and 1 hold rows; block 1 and a block with different rows never compare equal.
    assert extra.block_keys[0] and extra.block_keys[1] and extra.block_keys[0] != extra.block_keys[1]
    other = prepare_extra_inputs(spec, request(ids, image + 1), ids, block_size=4)
    assert other.block_keys[0] != extra.block_keys[0]


def test_memory_profiling_feeds_dummy_rows(model_dir):
    engine = Engine(str(model_dir), num_kv_blocks=16, block_size=4)
    seen = []
    forward = engine.runner.model.forward

    def recording_forward(input_ids, positions, **kwargs):
        seen.append((len(input_ids), kwargs))
        return forward(input_ids, positions, **kwargs)

    engine.runner.model.forward = recording_forward
    engine.runner.profile(32, 4, 64, engine.sampler)
    ((num_tokens, kwargs),) = seen
    rows = kwargs["extra_inputs"]["image"]
    assert num_tokens == 32 and rows.index.tolist() == list(range(32)) and rows.values.shape == (32, FEATURES)
    assert dummy_extra_inputs(object(), 32, torch.device("cpu")) == {}

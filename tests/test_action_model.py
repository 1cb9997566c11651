"""The action-conditioned world model of examples/action_model (installed by the README's test command):
registered through its entry point, loaded from its own checkpoint names, and generating, frame by frame
with the prefix cache supplying earlier frames, exactly the frames of its plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from miniengine import Engine

from miniengine_action_model.checkpoint import TINY, action_config, make_checkpoint  # isort: skip
from miniengine_action_model.reference import ReferenceWorldModel  # isort: skip
from miniengine_action_model.video import generate_videos  # isort: skip

VIDEOS, FRAMES = 4, 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = action_config(**TINY)
    return make_checkpoint(tmp_path_factory.mktemp("world_model"), config, seed=0, std=0.4), config


@pytest.fixture(scope="module")
def inputs(checkpoint):
    _, config = checkpoint
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(0, config["image_vocab_size"], (VIDEOS, config["tokens_per_frame"]), generator=generator)
    first[1] = first[0]  # two videos start alike and differ only in their actions
    actions = torch.randn(VIDEOS, FRAMES, config["actions_per_frame"], config["action_dim"], generator=generator)
    return first, actions


@pytest.fixture(scope="module")
def reference_frames(checkpoint, inputs):
    directory, config = checkpoint
    reference = ReferenceWorldModel(config, load_file(directory / "model.safetensors"))
    return reference.generate(*inputs)


class HitCounter:
    def __init__(self) -> None:
        self.hits = self.prompt_tokens = 0

    def record(self, stats) -> None:
        self.hits += stats.prefix_cache_hits
        self.prompt_tokens += stats.num_prompt_tokens


@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prompts", "chunked-prefill"])
def test_engine_frames_equal_the_reference(checkpoint, inputs, reference_frames, budget):
    directory, config = checkpoint
    counter = HitCounter()
    engine = Engine(str(directory), num_kv_blocks=128, block_size=4, max_num_batched_tokens=budget,
                    max_num_seqs=VIDEOS, stat_loggers=[counter])  # fmt: skip
    assert type(engine.runner.model).__name__ == "ActionWorldModel"  # found through the entry point
    frames = generate_videos(engine, *inputs)
    assert frames.shape == (VIDEOS, FRAMES, config["tokens_per_frame"])
    assert torch.equal(frames, reference_frames)
    assert not torch.equal(frames[0], frames[1])  # same first frame, different actions, different video
    # Request t > 0 finds in the prefix cache every full block request t-1 computed: its prompt and all but
    # the last token of the frame it generated. Only the rest of each prompt is computed.
    frame_len, block = config["tokens_per_frame"] + config["actions_per_frame"], 4
    hits = VIDEOS * sum((t * frame_len + config["tokens_per_frame"] - 1) // block * block for t in range(1, FRAMES))
    if budget == 7:
        # Fed in chunks, video 1 starts after video 0 has computed its first frame: it shares those blocks
        # (equal image tokens), but not the block holding its actions, which differ.
        hits += config["tokens_per_frame"] // block * block
    assert counter.hits == hits
    assert counter.prompt_tokens == VIDEOS * sum(t * frame_len for t in range(1, FRAMES + 1)) - hits


def test_a_checkpoint_tensor_without_a_place_is_named(checkpoint, tmp_path):
    directory, _ = checkpoint
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    weights = load_file(directory / "model.safetensors")
    weights["pos_embed.depth"] = torch.ones(3)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no place in ActionWorldModel: \['pos_embed.depth'\]"):
        Engine(str(tmp_path), num_kv_blocks=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_engine_frames_equal_the_reference_on_the_gpu(checkpoint, inputs, reference_frames, eager):
    """The CUDA path (Triton kernels, decode steps replayed as CUDA graphs, which never carry extra-input
    rows) in float32 gives the reference's frames exactly."""
    directory, _ = checkpoint
    engine = Engine(str(directory), dtype="float32", num_kv_blocks=256, max_num_seqs=VIDEOS, enforce_eager=eager,
                    stat_loggers=[])  # fmt: skip
    assert engine.platform.name == "cuda"
    assert torch.equal(generate_videos(engine, *inputs), reference_frames)

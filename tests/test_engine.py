"""The engine's API on a tiny random Llama (token-id prompts): limits, errors, dummy weights, the registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny_models import make_tiny_model

from miniengine import Engine, ModelRegistry, PromptTooLongError, SamplingParams
from miniengine.registry import UnsupportedArchitectureError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(str(model_dir), max_model_len=64, num_kv_blocks=32, block_size=4)


def test_max_model_len_ends_with_length(engine):
    out = engine.generate([list(range(1, 61))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64


def test_prompt_limits_are_typed_errors(engine):
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        engine.add_request(list(range(64)))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("text needs a tokenizer")
    with pytest.raises(TypeError, match="a prompt is"):
        engine.add_request(3.5)  # type: ignore[arg-type]
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_model_len_larger_than_cache_is_rejected(model_dir):
    with pytest.raises(ValueError, match=r"larger than the KV cache can hold \(64 tokens\)"):
        Engine(str(model_dir), max_model_len=100, num_kv_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="block_size=0"):
        Engine(str(model_dir), block_size=0)
    with pytest.raises(ValueError, match="below max_num_seqs"):
        Engine(str(model_dir), max_num_batched_tokens=8, max_num_seqs=16)


def test_n_siblings_share_the_prompt(engine):
    prompt = list(range(1, 30))
    hits = engine.block_manager.hits
    out = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.block_manager.hits - hits >= 2 * ((len(prompt) - 1) // 4)
    again = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]  # seeded: reproducible


def test_sharded_safetensors_load_the_same_model(engine, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(engine.model_path).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = Engine(str(tmp_path), max_model_len=64, num_kv_blocks=32, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [[5, 9, 2, 7, 1]]
    assert (
        sharded.generate(prompt, params)[0].outputs[0].token_ids
        == engine.generate(prompt, params)[0].outputs[0].token_ids
    )


def test_dummy_weights_run(model_dir):
    engine = Engine(str(model_dir), load_format="dummy", num_kv_blocks=16)
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


def test_unknown_architecture_says_how_to_register(model_dir, tmp_path):
    config = (model_dir / "config.json").read_text().replace("LlamaForCausalLM", "MyOwnForCausalLM")
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(UnsupportedArchitectureError, match="general plugin"):
        Engine(str(tmp_path))
    ModelRegistry.register_model("MyOwnForCausalLM", "miniengine.models.llama:LlamaForCausalLM")
    for weights in model_dir.glob("*.safetensors"):
        (tmp_path / weights.name).write_bytes(weights.read_bytes())
    Engine(str(tmp_path), num_kv_blocks=8)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a .gguf file nor a directory"):
        Engine(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_cli_chat_with_the_default_model(smollm2_path):
    command = ["generate", "--chat", "--max-tokens", "24", "What is the capital of France?"]
    result = subprocess.run([sys.executable, "-m", "miniengine", *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_reports_bad_options(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "miniengine", "generate", "--model", str(model_dir), "--top-p", "2", "hi"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "SamplingParams.top_p" in result.stderr


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stat_loggers_receive_every_step(model_dir, async_scheduling):
    class Recorder:
        def __init__(self):
            self.steps = []

        def record(self, stats):
            self.steps.append(stats)

    recorder = Recorder()
    engine = Engine(
        str(model_dir), num_kv_blocks=64, block_size=4, stat_loggers=[recorder], async_scheduling=async_scheduling
    )
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.generate([[1, 2, 3] * 10, [4, 5, 6] * 7], params, use_tqdm=False)
    steps = recorder.steps
    assert sum(s.num_generation_tokens for s in steps) == 10
    assert sum(s.num_prompt_tokens for s in steps) == 30 + 21
    assert len([t for s in steps for t in s.time_to_first_token]) == 2
    assert len([t for s in steps for t in s.inter_token_latency]) == 8
    finished = [f for s in steps for f in s.finished]
    assert sorted(f.num_prompt_tokens for f in finished) == [21, 30] and all(f.e2e_latency > 0 for f in finished)
    engine.generate([[1, 2, 3] * 10], params, use_tqdm=False)  # the same prompt: its full blocks are cached
    assert sum(s.prefix_cache_hits for s in recorder.steps) == 28
    assert recorder.steps[-1].kv_cache_usage == 0.0


def test_a_platform_that_compiles_kernels_warms_every_step_shape_up_at_start(model_dir, monkeypatch):
    """Start-up runs a step of each shape a JIT-compiled kernel picks a variant by (token counts up to the
    step budget, decode / mixed / prefix-hit batches planned for every longest context up to
    max_model_len), and leaves no trace: the same tokens as without, every block free."""
    from miniengine.model_runner import ModelRunner
    from miniengine.platforms.cpu import CpuPlatform

    prompts = [list(range(1, 40)), list(range(5, 12))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    options = dict(max_model_len=64, num_kv_blocks=32, block_size=4, max_num_batched_tokens=48, max_num_seqs=8)
    plain = [o.outputs[0].token_ids for o in Engine(str(model_dir), **options).generate(prompts, params)]

    steps = []
    forward = ModelRunner.forward
    monkeypatch.setattr(CpuPlatform, "compiles_kernels", True)
    monkeypatch.setattr(
        ModelRunner, "forward", lambda self, step, *a, **k: steps.append(step) or forward(self, step, *a, **k)
    )
    engine = Engine(str(model_dir), **options)
    assert sorted({len(s.input_ids) for s in steps if s.num_seqs == 1 and s.max_seq_len == len(s.input_ids)}) == [
        1, 2, 4, 8, 16, 32, 48,
    ]  # fmt: skip
    assert {s.max_seq_len for s in steps if s.num_seqs == 8} == {64, 16, 32}  # a mixed batch per planned context
    warmed = len(steps)
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, params)] == plain
    assert len(steps) > warmed
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_steps_device_inputs_each_start_16_byte_aligned(engine):
    """Odd-length parts (3 tokens, 2 sequences) still leave every tensor of the step 16-byte aligned: a JIT
    kernel compiles a variant per pointer alignment, so alignment must not follow the batch's shape."""
    from miniengine.model_runner import prepare
    from miniengine.scheduler import ScheduledBatch
    from miniengine.sequence import Sequence

    seqs = [Sequence(-1, "a", [1, 2], SamplingParams()), Sequence(-2, "b", [3], SamplingParams())]
    for i, seq in enumerate(seqs):
        seq.block_table = [i]
    step = prepare(ScheduledBatch(seqs, [2, 1]), engine.runner.block_size)
    ids, positions, metadata, rows = engine.runner.to_device(step)
    tensors = [ids, positions, rows, metadata.slot_mapping, metadata.query_start_loc, metadata.seq_lens,
               metadata.block_tables]  # fmt: skip
    assert all(t.data_ptr() % 16 == 0 for t in tensors)
    assert ids.tolist() == [1, 2, 3] and positions.tolist() == [0, 1, 0] and rows.tolist() == [1, 2]
    assert metadata.query_start_loc.tolist() == [0, 2, 3] and metadata.block_tables.tolist() == [[0], [1]]

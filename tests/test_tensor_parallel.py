"""Tensor and expert parallelism on the CPU (gloo): two ranks, the driver and one spawned worker, give the
same greedy tokens as one rank and as transformers; faults in a worker raise promptly; shutdown leaves no
process behind; two loopback "hosts" equal two ranks on one host.

Every test starts real worker processes (a few seconds each), so each model is compared in one engine run
that mixes decodes with prefill chunks.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from tiny_models import hf_greedy, make_tiny_model

from miniengine import Engine, ModelRegistry, SamplingParams
from miniengine.distributed import DriverOnlyModelError, WorkerError
from miniengine.models.llama import LlamaForCausalLM
from miniengine.models.parallel import current_tp

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPTS = [[3, 14, 15, 92, 65], list(range(20, 60)), [7] * 21, list(range(400, 433))]
SMALL = dict(num_kv_blocks=64, max_num_batched_tokens=32, max_num_seqs=8)  # chunks the 40-token prompt


def generate(model: str, **options) -> list[list[int]]:
    engine = Engine(model, **SMALL, **options)
    try:
        return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        engine.shutdown()
        assert not multiprocessing.active_children(), "shutdown leaves no worker process"


def tiny(directory, name: str) -> tuple[str, list[list[int]]]:
    """A tiny random `name` checkpoint in `directory`, and transformers' greedy tokens for PROMPTS."""
    make_tiny_model(directory, name)
    return str(directory), hf_greedy(directory, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_two_ranks_equal_one_and_transformers(name, llama, tmp_path):
    """Llama: 4 query heads, 2 KV heads (one each); Qwen3: its own head_dim and q/k norms."""
    directory, expected = llama if name == "llama" else tiny(tmp_path, name)
    assert generate(directory) == expected
    assert generate(directory, tensor_parallel_size=2) == expected


def test_one_message_per_step(llama, monkeypatch):
    """The driver sends the workers one broadcast per step (the layers' collectives aside)."""
    import miniengine.distributed as distributed

    engine = Engine(llama[0], tensor_parallel_size=2, **SMALL)
    messages, steps = [], []
    send, run = distributed.broadcast, engine.runner.run
    monkeypatch.setattr(
        distributed, "broadcast", lambda message, group: messages.append(message[0]) or send(message, group)
    )
    monkeypatch.setattr(engine.runner, "run", lambda *args: steps.append(1) or run(*args))
    try:
        assert [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)] == llama[1]
    finally:
        engine.shutdown()
    assert messages == ["execute"] * len(steps) + ["shutdown"] and len(steps) > MAX_TOKENS


def test_kv_heads_fewer_than_ranks_are_copied_and_dummy_weights_match(tmp_path):
    """Qwen2 here ties its embeddings (the head is the vocab-parallel embedding) and has q/k/v biases; with 4
    ranks and 2 KV heads each KV head lives on two ranks. Random weights are the same model at every size."""
    directory = str(make_tiny_model(tmp_path, "qwen2"))
    one = generate(directory, load_format="dummy")
    assert generate(directory, load_format="dummy", tensor_parallel_size=4) == one


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "expert-parallel"])
def test_moe_two_ranks_equal_one(expert_parallel, qwen3_moe):
    """8 experts, top-3, one dense layer: each rank holds half of every expert, or 4 whole experts."""
    directory, expected = qwen3_moe
    assert generate(directory, tensor_parallel_size=2, enable_expert_parallel=expert_parallel) == expected


def test_example_plugin_model_loads_in_the_worker(llama, tmp_path):
    from miniengine_example_plugin.checkpoint import convert_llama_checkpoint

    directory, expected = llama
    converted = str(convert_llama_checkpoint(directory, tmp_path))
    assert generate(converted, tensor_parallel_size=2) == expected


def test_each_rank_sizes_its_kv_cache_and_the_smallest_count_wins(llama, monkeypatch):
    """Each rank holds half of the KV heads, so the same memory budget per rank holds twice the blocks."""
    monkeypatch.setenv("MINIENGINE_CPU_KV_CACHE_GIB", str(2**-10))  # 1 MiB, in every process
    options = dict(max_num_batched_tokens=32, max_num_seqs=8)
    counts = []
    for size in (1, 2):
        engine = Engine(llama[0], tensor_parallel_size=size, **options)
        counts.append(engine.block_manager.num_blocks)
        engine.shutdown()
    assert counts[1] == 2 * counts[0] > 0


def test_sizes_that_do_not_divide_the_heads_are_refused(llama):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not divide num_attention_heads \(4\)"):
        Engine(llama[0], tensor_parallel_size=3, **SMALL)


class DriverOnlyLlama(LlamaForCausalLM):
    pass


class FailsInWorker(LlamaForCausalLM):
    def __init__(self, config) -> None:
        if current_tp().rank == 1:
            raise RuntimeError("rank 1 cannot build this model")
        super().__init__(config)


def with_architecture(source: str, target, architecture: str) -> str:
    """A copy of checkpoint `source` (symlinked files) whose config names `architecture`."""
    import json

    os.makedirs(target)
    for name in os.listdir(source):
        if name != "config.json":
            os.symlink(os.path.join(source, name), os.path.join(target, name))
    config = json.loads(open(os.path.join(source, "config.json")).read())
    config["architectures"] = [architecture]
    open(os.path.join(target, "config.json"), "w").write(json.dumps(config))
    return str(target)


def test_a_model_registered_in_the_driver_script_is_a_clear_error(llama, tmp_path):
    script_class = type("ScriptLlama", (LlamaForCausalLM,), {"__module__": "__main__"})  # as in a user's script
    ModelRegistry.register_model("ScriptLlamaForCausalLM", script_class)
    directory = with_architecture(llama[0], tmp_path / "script", "ScriptLlamaForCausalLM")
    with pytest.raises(DriverOnlyModelError, match="'ScriptLlamaForCausalLM'.*'miniengine.general_plugins'"):
        Engine(directory, tensor_parallel_size=2, **SMALL)
    assert not multiprocessing.active_children()


def test_a_driver_registration_of_an_importable_class_reaches_the_worker(llama, tmp_path):
    """The driver sends its registration as "module:Class"; a worker error comes back with its traceback."""
    ModelRegistry.register_model("DriverOnlyLlamaForCausalLM", DriverOnlyLlama)
    directory = with_architecture(llama[0], tmp_path / "driver", "DriverOnlyLlamaForCausalLM")
    assert generate(directory, tensor_parallel_size=2) == llama[1]
    ModelRegistry.register_model("FailsInWorkerForCausalLM", FailsInWorker)
    directory = with_architecture(llama[0], tmp_path / "fails", "FailsInWorkerForCausalLM")
    with pytest.raises(WorkerError, match="(?s)Traceback.*rank 1 cannot build this model"):
        Engine(directory, tensor_parallel_size=2, **SMALL)
    assert not multiprocessing.active_children()


def test_a_killed_worker_makes_the_engine_raise_within_seconds(llama):
    engine = Engine(llama[0], tensor_parallel_size=2, **SMALL)
    (worker,) = engine.runner.procs
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True))
    engine.step()
    killed = threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL))  # mid-run: a step may be in flight
    killed.start()
    start = time.monotonic()
    with pytest.raises(WorkerError, match=f"pid {worker.pid}"):
        while time.monotonic() - start < 60:
            engine.step()
    assert time.monotonic() - start < 10
    killed.join()
    with pytest.raises(WorkerError):  # and every later step says so too
        engine.step()
    engine.shutdown()
    assert not worker.is_alive() and not multiprocessing.active_children()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_loopback_hosts_equal_two_ranks_on_one(llama):
    """Host 1 is `miniengine worker --node-rank 1`, a separate program; host 0 is the engine."""
    port = free_port()
    flags = ["--distributed-init-method", f"tcp://127.0.0.1:{port}", "--tensor-parallel-size", "2", "--nnodes", "2"]
    worker = subprocess.Popen([sys.executable, "-m", "miniengine", "worker", *flags, "--node-rank", "1"])
    try:
        tokens = generate(llama[0], tensor_parallel_size=2, nnodes=2, distributed_init_method=f"tcp://127.0.0.1:{port}")
        assert worker.wait(timeout=30) == 0, "the worker host leaves when the engine shuts down"
    finally:
        worker.kill()
    assert tokens == llama[1]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", port))  # nobody listens on the rendezvous port any more


@torch.inference_mode()
def logits_after(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """The engine's logits after `tokens` (a one-sequence prefill step in free KV blocks), on every rank."""
    from miniengine.model_runner import prepare
    from miniengine.scheduler import ScheduledBatch
    from miniengine.sequence import Sequence

    seq = Sequence(-1, "probe", list(tokens), GREEDY)
    seq.block_table = list(range(-(-len(tokens) // engine.config.block_size)))
    return engine.runner.execute(prepare(ScheduledBatch([seq], [len(tokens)]), engine.config.block_size))[0].float()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_two_ranks_equal_one_bf16(tmp_path):
    """Llama-3-8B's shape with 4 layers, the same random bf16 weights on one GPU and split over two.

    Two ranks sum each row-parallel product in another order (two bf16 partial sums, then the all-reduce),
    so, as in test_gpu_models, greedy paths may part only at a near-tie: where the top two logits of one
    GPU are closer than the two runs' logits differ on the same tokens (measured at every divergence)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from presets import model_dir

    directory = str(model_dir("llama-3-8b", tmp_path, num_hidden_layers=4))
    options = dict(load_format="dummy", dtype="bfloat16", num_kv_blocks=1024, max_num_batched_tokens=256,
                   max_num_seqs=32, stat_loggers=[])  # fmt: skip
    rng = random.Random(0)
    prompts = [[rng.randrange(128000) for _ in range(n)] for n in (5, 17, 33, 64, 100, 129, 200, 257)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    engines = [Engine(directory, tensor_parallel_size=size, **options) for size in (1, 2)]
    try:
        one, two = ([o.outputs[0].token_ids for o in e.generate(prompts, params, use_tqdm=False)] for e in engines)
        exact = 0
        for prompt, a, b in zip(prompts, one, two):
            single, split = (logits_after(e, prompt) for e in engines)  # a broken shard is off by O(1), not 1%
            assert (single - split).abs().max() <= 0.05 * single.abs().max(), f"prompt of {len(prompt)} tokens"
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if step is None:
                exact += 1
                continue
            single, split = (logits_after(e, prompt + a[:step]) for e in engines)
            top2 = single.topk(2).values
            difference = (single - split).abs().max().item()
            assert (top2[0] - top2[1]).item() <= difference, f"prompt of {len(prompt)}: parted at step {step}"
        print(f"\nTP=2 vs TP=1, bf16: {exact}/{len(prompts)} prompts identical")
    finally:
        for engine in engines:
            engine.shutdown()


def test_gguf_slices_dequantize_only_what_a_rank_takes(smollm2_path):
    """Rows come from their raw quantized blocks, block-aligned columns too; an unaligned slice is cut after
    dequantizing the rows; Llama q/k rows are un-permuted per head, so a slice of whole heads is right."""
    from miniengine.gguf_loader import load_gguf

    checkpoint = load_gguf(smollm2_path)
    wanted = {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    lazy = {n: t for n, t in checkpoint.weights(lazy=True) if n in wanted}
    full = {}  # the whole tensors, as the single-process loader reads them (test_gguf.py checks those)
    for name, tensor in checkpoint.weights():
        full.update({name: tensor} if name in wanted else {})
        if len(full) == len(wanted):
            break
    embed, down = lazy["model.embed_tokens.weight"], lazy["model.layers.0.mlp.down_proj.weight"]
    q = lazy["model.layers.0.self_attn.q_proj.weight"]
    head_dim = q.shape[0] // 9
    cases = [
        ("model.embed_tokens.weight", embed.narrow(0, 24576, 24576), (slice(24576, 49152),)),
        ("model.layers.0.self_attn.q_proj.weight", q.narrow(0, 3 * head_dim, 3 * head_dim), (slice(192, 384),)),
        ("model.layers.0.mlp.down_proj.weight", down.narrow(1, 768, 768), (slice(None), slice(768, 1536))),
        ("model.layers.0.mlp.down_proj.weight", down.narrow(1, 5, 100).narrow(0, 7, 9), (slice(7, 16), slice(5, 105))),
    ]
    for name, part, index in cases:
        assert torch.equal(part.materialize(), full[name][index]), name

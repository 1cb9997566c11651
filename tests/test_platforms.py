"""Platform resolution: built-ins (cpu, cuda, npu), out-of-tree platforms from the entry-point group
`miniengine.platform_plugins` (detected, forced, refused when two claim the machine), and the NPU platform
against a stand-in `torch_npu` module (no NPU here: its detection, selection, configuration and the argument
plumbing of its fused attention are what can be checked)."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from fake_plugins import fresh_plugins, write_package  # noqa: F401  (a fixture)
from tiny_models import make_tiny_model

import miniengine.platforms
from miniengine import Engine, SamplingParams
from miniengine.config import EngineConfig
from miniengine.forward_context import AttentionMetadata
from miniengine.kernels.paged_attention import paged_attention_ref
from miniengine.platforms import PlatformError, resolve_platform
from miniengine.platforms.cpu import CpuPlatform
from miniengine.platforms.npu import NpuPlatform
from miniengine.plugins import PLATFORM_PLUGINS

ACCEL = """
    import os

    from miniengine.forward_context import Kernels
    from miniengine.kernels.paged_attention import paged_attention_sdpa, store_kv
    from miniengine.platforms.cpu import CpuPlatform

    attend_calls = []

    def counting_attend(*args):
        attend_calls.append(args[0].shape[0])
        return paged_attention_sdpa(*args)

    class AccelPlatform(CpuPlatform):
        name = "accel"

        def kernels(self):
            return Kernels("accel", store_kv, counting_attend)

    class OtherPlatform(CpuPlatform):
        name = "other"

    def detect_accel():
        return "fake_accel:AccelPlatform" if os.environ.get("FAKE_ACCEL") else None

    def detect_other():
        return "fake_accel:OtherPlatform" if os.environ.get("FAKE_OTHER") else None

    def detect_crashes():
        raise RuntimeError("the driver crashed")
"""


@pytest.fixture
def accel(tmp_path, monkeypatch, fresh_plugins):  # noqa: F811
    points = {
        "accel": "fake_accel:detect_accel",
        "other": "fake_accel:detect_other",
        "flaky": "fake_accel:detect_crashes",
    }
    root = write_package(tmp_path / "site", "fake-accel", {PLATFORM_PLUGINS: points}, {"fake_accel": ACCEL})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(miniengine.platforms, "_logged", set())
    sys.modules.pop("fake_accel", None)
    yield
    sys.modules.pop("fake_accel", None)


def test_auto_falls_back_to_the_cpu_and_logs_the_choice_once(accel, caplog):
    with caplog.at_level(logging.INFO, logger="miniengine"):
        first, second = resolve_platform("auto"), resolve_platform()
    assert type(first) is CpuPlatform and type(second) is CpuPlatform
    chosen = [r.getMessage() for r in caplog.records if "miniengine platform" in r.getMessage()]
    assert chosen == ["miniengine platform: cpu (auto-detected, miniengine.platforms.cpu.CpuPlatform)"]
    assert "'flaky'" in caplog.text and "the driver crashed" in caplog.text  # reported, and skipped


def test_one_claiming_plugin_wins_two_are_refused(accel, monkeypatch):
    monkeypatch.setenv("FAKE_ACCEL", "1")
    assert resolve_platform("auto").name == "accel"
    monkeypatch.setenv("FAKE_OTHER", "1")
    with pytest.raises(PlatformError, match="platform plugins 'accel' and 'other' all claim this machine"):
        resolve_platform("auto")
    assert resolve_platform("other").name == "other"  # forcing one settles it
    monkeypatch.setenv("MINIENGINE_PLUGINS", "accel")  # or leaving the other out
    assert resolve_platform("auto").name == "accel"


def test_forcing_by_name(accel, monkeypatch):
    assert type(resolve_platform("cpu")) is CpuPlatform
    with pytest.raises(PlatformError, match="'accel' was asked for, but finds no hardware"):
        resolve_platform("accel")
    with pytest.raises(PlatformError, match="'flaky' failed while detecting its hardware: the driver crashed"):
        resolve_platform("flaky")
    with pytest.raises(PlatformError, match="'cuda' was asked for, but it is not available"):
        resolve_platform("cuda")
    with pytest.raises(PlatformError, match="'npu' was asked for, but it is not available"):
        resolve_platform("npu")  # no torch_npu here
    with pytest.raises(PlatformError, match="choose one of auto, cuda, npu, cpu, accel, flaky, other"):
        resolve_platform("tpu")
    monkeypatch.setenv("FAKE_ACCEL", "1")
    assert resolve_platform("accel").name == "accel"


def test_an_engine_runs_on_a_plugin_platform(accel, monkeypatch, tmp_path):
    import fake_accel

    model_dir = make_tiny_model(tmp_path / "llama", "llama")
    monkeypatch.setenv("FAKE_ACCEL", "1")
    engine = Engine(str(model_dir), num_kv_blocks=16, block_size=4)
    assert engine.platform.name == "accel"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ours = engine.generate([[4, 8, 15, 16, 23, 42]], params)[0].outputs[0].token_ids
    assert fake_accel.attend_calls[:2] == [6, 6]  # the prompt, through the plugin's kernel, in both layers
    reference = Engine(str(model_dir), device="cpu", num_kv_blocks=16, block_size=4)
    assert reference.generate([[4, 8, 15, 16, 23, 42]], params)[0].outputs[0].token_ids == ours


# ---- the NPU platform against a stand-in torch_npu --------------------------------------------------------


def _incre_flash_attention(query, key, value, *, num_heads, num_key_value_heads, scale_value, input_layout,
                           block_table, block_size, actual_seq_lengths):  # fmt: skip
    """torch_npu.npu_incre_flash_attention's documented PageAttention contract, in plain torch: query
    [B, 1, H*D] (BSH), key/value [blocks, block_size, kvH*D], an int32 block table, host lengths."""
    assert input_layout == "BSH" and block_table.dtype == torch.int32 and query.dim() == 3
    assert block_size % 16 == 0 and key.shape[1] == block_size and len(actual_seq_lengths) == query.shape[0]
    head_dim = query.shape[2] // num_heads
    out = torch.full_like(query, float("nan"))
    for b, n in enumerate(actual_seq_lengths):
        rows = block_table[b, : -(-n // block_size)].long()
        k = key[rows].reshape(-1, num_key_value_heads, head_dim)[:n].float()
        v = value[rows].reshape(-1, num_key_value_heads, head_dim)[:n].float()
        group = num_heads // num_key_value_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        q = query[b, 0].view(num_heads, head_dim).float()
        weights = torch.softmax(torch.einsum("hd,khd->hk", q, k) * scale_value, dim=-1)
        out[b, 0] = torch.einsum("hk,khd->hd", weights, v).reshape(-1).to(query.dtype)
    return out


@pytest.fixture
def stand_in_npu(monkeypatch):
    calls = {"fused": 0, "seed": []}

    def fused(*args, **kwargs):
        calls["fused"] += 1
        return _incre_flash_attention(*args, **kwargs)

    torch_npu = types.ModuleType("torch_npu")
    torch_npu.npu_incre_flash_attention = fused
    npu = types.SimpleNamespace(
        is_available=lambda: True, current_device=lambda: 0, set_device=lambda i: None, is_bf16_supported=lambda: True,
        mem_get_info=lambda: (50 * 2**30, 64 * 2**30), memory_reserved=lambda: 6 * 2**30, empty_cache=lambda: None,
        reset_peak_memory_stats=lambda: None, max_memory_allocated=lambda: 5 * 2**30, synchronize=lambda: None,
        manual_seed_all=lambda s: calls["seed"].append(s),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch_npu", torch_npu)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(miniengine.platforms, "_logged", set())
    return calls


def test_npu_is_detected_and_forced_with_torch_npu_present(stand_in_npu, fresh_plugins):  # noqa: F811
    assert NpuPlatform.is_available()
    assert type(resolve_platform("auto")) is NpuPlatform  # no CUDA here: the NPU comes before the CPU
    assert type(resolve_platform("npu")) is NpuPlatform
    assert type(resolve_platform("cpu")) is CpuPlatform


def test_npu_configuration(stand_in_npu):
    platform = NpuPlatform()
    assert (platform.dist_backend, platform.device_type, platform.supports_graphs) == ("hccl", "npu", False)
    assert platform.default_dtype() == torch.bfloat16
    config = EngineConfig(block_size=20, gpu_memory_utilization=0.5)
    platform.check_and_update_config(config)
    assert config.enforce_eager and config.block_size == 32  # the fused kernel's 16-alignment
    profiled = []
    budget = platform.kv_cache_bytes(config, model_bytes=2**30, profile=lambda: profiled.append(1) or 5 * 2**30)
    # 0.5 x 64 GiB, less the profiled peak (5 GiB) and what others hold (64 - 50 free - 6 reserved = 8 GiB)
    assert profiled == [1] and budget == (32 - 5 - 8) * 2**30
    platform.seed(7)
    assert stand_in_npu["seed"] == [7]


def test_npu_fused_decode_attention_matches_the_reference(stand_in_npu):
    """Our cache layout and metadata, handed to the fused kernel as its documentation says, give the same
    attention as the plain-torch reference; prefill steps and float32 stay on the plain-torch path."""
    kernels = NpuPlatform().kernels()
    assert kernels.name == "npu"
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, heads, head_dim = 12, 16, 2, 4, 8
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    seq_lens = [5, 37, 16]
    tables = torch.tensor([[3, 0, 0], [7, 1, 10], [4, 0, 0]])  # int64, as the runner builds them

    def metadata(query_lens):
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            slot_mapping=torch.empty(0), block_tables=tables, query_start_loc=torch.tensor(starts),
            seq_lens=torch.tensor(seq_lens), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_start_loc_host=starts, seq_lens_host=seq_lens,
        )  # fmt: skip

    query = torch.randn(3, heads, head_dim, dtype=torch.bfloat16)
    got = kernels.attend(query, k_cache, v_cache, metadata([1, 1, 1]), 0.3)
    want = paged_attention_ref(query, k_cache, v_cache, metadata([1, 1, 1]), 0.3)
    assert stand_in_npu["fused"] == 1
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    prefill = torch.randn(7, heads, head_dim, dtype=torch.bfloat16)
    kernels.attend(prefill, k_cache, v_cache, metadata([2, 4, 1]), 0.3)
    kernels.attend(query.float(), k_cache.float(), v_cache.float(), metadata([1, 1, 1]), 0.3)
    assert stand_in_npu["fused"] == 1

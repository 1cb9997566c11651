"""The physical floor of a decode-heavy LLM workload: no engine can beat it on a given device.

    a step's floor = max(bytes it must move / memory bandwidth,  FLOPs it must do / peak FLOP/s)

A decode step reads every weight once and the KV cache of every sequence so far, and does 2 * params FLOPs
per token (one multiply-add per weight). A prefill step reads the weights once and does 2 * params FLOPs
per prompt token, less the LM head for all but each sequence's last token (only sampled tokens need
logits). Attention FLOPs, activations and K/V writes are left out, so the floor stays a lower bound.
GPU peaks come from the spec sheets, or are measured in the bench's own run (`gpu_copy_bandwidth`,
`gpu_matmul_rate`); CPU peaks are measured here, at bench time.

    python bench/roofline.py            # prints the measured CPU peaks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: float  # FLOP/s of the dtype the engine runs in (dense, no sparsity)
    bandwidth: float  # bytes/s of main memory (HBM, or DRAM for a CPU)
    source: str


# Spec values, not measurements. NVIDIA's data sheets quote BF16 Tensor Core throughput "with sparsity";
# dense is half of it.
#   H100 SXM5 80GB: BF16 1,979 TFLOPS with sparsity (989.5 dense), HBM3 3.35 TB/s   (NVIDIA H100 data sheet)
#   H100 PCIe 80GB: BF16 1,513 TFLOPS with sparsity (756 dense),   HBM2e 2.0 TB/s   (NVIDIA H100 data sheet)
#   H200 SXM 141GB: BF16 1,979 TFLOPS with sparsity (989.5 dense), HBM3e 4.8 TB/s   (NVIDIA H200 data sheet)
GPU_PEAKS: dict[str, DevicePeak] = {
    "H100 SXM": DevicePeak("NVIDIA H100 SXM5 80GB", 989.5e12, 3.35e12, "NVIDIA spec sheet, bf16 dense"),
    "H100 PCIe": DevicePeak("NVIDIA H100 PCIe 80GB", 756e12, 2.0e12, "NVIDIA spec sheet, bf16 dense"),
    "H200": DevicePeak("NVIDIA H200 SXM 141GB", 989.5e12, 4.8e12, "NVIDIA spec sheet, bf16 dense"),
}


def gpu_peak(device_name: str) -> DevicePeak | None:
    """The spec peak of a GPU named like torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", ...)."""
    name = device_name.upper()
    if "H200" in name:
        return GPU_PEAKS["H200"]
    if "H100" in name:
        return GPU_PEAKS["H100 PCIe"] if "PCIE" in name else GPU_PEAKS["H100 SXM"]
    return None


# ---- measured CPU peaks ----------------------------------------------------------------------------------


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: page faults, thread pool start, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_flops(sizes: Sequence[int] = (1024, 2048), repeats: int = 10, dtype=torch.float32) -> float:
    """FLOP/s of large square matmuls (2 * n^3 FLOPs each), the best over sizes and `repeats`."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        out = torch.empty(size, size, dtype=dtype)
        seconds = _best_time(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), repeats)
        best = max(best, 2 * size**3 / seconds)
    return best


def measure_memory_bandwidth(mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of a large copy (counted as read + write) and of a large sum (read only), best of `repeats`.

    The buffers are far larger than any CPU cache, so both stream from DRAM.
    """
    n = mib * 2**20 // 4
    src = torch.rand(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), repeats)
    sum_s = _best_time(lambda: src.sum(), repeats)
    nbytes = src.numel() * src.element_size()
    return {"copy": 2 * nbytes / copy_s, "read": nbytes / sum_s}


def measure_cpu_peak(quick: bool = False) -> DevicePeak:
    """Measured fp32 matmul FLOP/s and memory bandwidth of this CPU, with torch's current thread count.

    Each figure is the best of many short runs, so a moment of quiet on a shared machine is enough to see
    the peak; the bandwidth is the better of copy and read. A floor must use the highest rate reached.
    """
    flops = measure_matmul_flops((1024,) if quick else (1024, 2048), 5 if quick else 15)
    bw = measure_memory_bandwidth(128 if quick else 256, 3 if quick else 12)
    return DevicePeak(
        cpu_model(),
        flops,
        max(bw.values()),
        f"measured: fp32 square torch.matmul, bandwidth max(copy {bw['copy'] / 1e9:.1f}, read "
        f"{bw['read'] / 1e9:.1f}) GB/s, {torch.get_num_threads()} threads",
    )


def best_peak(*peaks: DevicePeak) -> DevicePeak:
    """The highest FLOP/s and bandwidth of several measurements (say, before and after a benchmark)."""
    flops = max(peaks, key=lambda p: p.flops)
    bw = max(peaks, key=lambda p: p.bandwidth)
    return DevicePeak(flops.name, flops.flops, bw.bandwidth, f"best of {len(peaks)}: {bw.source}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


# ---- measured GPU peaks ----------------------------------------------------------------------------------


def _median_cuda_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: allocation, kernel selection
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gpu_copy_bandwidth(device: torch.device | str = "cuda", mib: int = 2048, repeats: int = 20) -> float:
    """Bytes/s of a large device-to-device copy, counted as read + write, the median of `repeats`.

    The buffers dwarf the L2 cache, so this is the bandwidth of memory that a streaming kernel can reach.
    """
    src = torch.randint(0, 255, (mib * 2**20,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_cuda_seconds(lambda: dst.copy_(src), repeats)


def gpu_matmul_rate(
    device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, size: int = 8192, repeats: int = 20
) -> float:
    """FLOP/s of a large square matmul of random data (2 * size^3 FLOPs), the median of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _median_cuda_seconds(lambda: torch.matmul(a, b, out=out), repeats)


def measure_gpu_peak(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> DevicePeak:
    """This GPU's peaks as measured now: `gpu_matmul_rate` in `dtype` and `gpu_copy_bandwidth`."""
    flops, bandwidth = gpu_matmul_rate(device, dtype), gpu_copy_bandwidth(device)
    name = torch.cuda.get_device_name(device)
    return DevicePeak(name, flops, bandwidth, f"measured: {dtype} 8192^3 matmul, 2 GiB device copy (median of 20)")


# ---- the workload ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    body_params: int  # weights every token multiplies through: the decoder layers (and final norm)
    head_params: int  # the LM head: only tokens whose logits are sampled go through it
    weight_bytes: int  # bytes a step must read: every weight, each tied weight once, an untied embedding table not
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_bytes_per_element: int

    @property
    def num_params(self) -> int:
        return self.body_params + self.head_params

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_element

    @classmethod
    def from_model(cls, model: torch.nn.Module, config, kv_dtype: torch.dtype | None = None) -> ModelSpec:
        """From a torch model with an `lm_head` and its HF-style config.

        An embedding lookup reads a few rows and does no FLOPs; when the LM head is tied to it, the shared
        matrix counts once, as the head.
        """
        head = model.lm_head.weight
        embeds = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head]
        skip = {id(head)} | {id(w) for w in embeds}
        body = [p for p in model.parameters() if id(p) not in skip]  # parameters() yields a tied weight once
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_dtype = kv_dtype or head.dtype
        return cls(
            body_params=sum(p.numel() for p in body),
            head_params=head.numel(),
            weight_bytes=sum(p.numel() * p.element_size() for p in [*body, head]),
            num_layers=config.num_hidden_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            kv_bytes_per_element=torch.empty(0, dtype=kv_dtype).element_size(),
        )


def step_floor(spec: ModelSpec, peak: DevicePeak, num_tokens: int, num_sampled: int, kv_tokens_read: int) -> float:
    """Seconds of one forward step over `num_tokens` new tokens, `num_sampled` of them through the LM head,
    reading `kv_tokens_read` cached tokens: max(bytes / bandwidth, FLOPs / peak)."""
    bytes_moved = spec.weight_bytes + kv_tokens_read * spec.kv_bytes_per_token
    flops = 2 * spec.body_params * num_tokens + 2 * spec.head_params * num_sampled
    return max(bytes_moved / peak.bandwidth, flops / peak.flops)


def decode_step_floor(spec: ModelSpec, peak: DevicePeak, context_lens: Sequence[int]) -> float:
    """One decode step: one new token per sequence (2 * params FLOPs each), each reading its
    `context_lens[i]` cached tokens, after all the weights."""
    return step_floor(spec, peak, len(context_lens), len(context_lens), sum(context_lens))


def generation_floor(spec: ModelSpec, peak: DevicePeak, prompt_lens: Sequence[int], max_tokens: int) -> dict:
    """Floor of an offline batch: every prompt prefilled in one step, then `max_tokens - 1` decode steps.

    The prefill step gives each sequence its first token (the LM head runs on its last prompt token only);
    decode step j (1-based) feeds token j and reads the prompt plus the j - 1 tokens after it.
    """
    prefill = step_floor(spec, peak, sum(prompt_lens), len(prompt_lens), 0)
    decode = 0.0
    compute_bound_steps = 0
    for j in range(1, max_tokens):
        lens = [p + j - 1 for p in prompt_lens]  # cached tokens read by step j, the new token's K/V aside
        t = decode_step_floor(spec, peak, lens)
        decode += t
        compute_bound_steps += t == 2 * spec.num_params * len(lens) / peak.flops
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "total_s": prefill + decode,
        "decode_step_ms_mean": 1e3 * decode / max(max_tokens - 1, 1),
        "decode_steps": max_tokens - 1,
        "decode_steps_compute_bound": compute_bound_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller buffers, fewer repeats")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args()
    peak = measure_cpu_peak(args.quick)
    if args.json:
        print(json.dumps(asdict(peak), indent=2))
        return
    print(f"CPU:       {peak.name} ({torch.get_num_threads()} torch threads)")
    print(f"fp32 peak: {peak.flops / 1e9:8.1f} GFLOP/s")
    print(f"bandwidth: {peak.bandwidth / 1e9:8.1f} GB/s  ({peak.source})")
    print(f"ridge:     {peak.flops / peak.bandwidth:8.1f} FLOP/byte")
    for key, gpu in GPU_PEAKS.items():
        print(f"{key:10} {gpu.flops / 1e12:7.1f} TFLOP/s  {gpu.bandwidth / 1e12:5.2f} TB/s  ({gpu.source})")


if __name__ == "__main__":
    main()

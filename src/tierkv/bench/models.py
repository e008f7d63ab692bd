"""Model presets for the serving-trace benchmark, and how long recomputing a prompt's KV takes.

A preset gives the KV shape (what a block weighs) and enough of the architecture to count prefill FLOPs. The
recompute time of tokens ``[start, end)`` of a prompt is FLOPs / achieved FLOP/s, with the standard count
(Kaplan et al. 2020, "Scaling Laws for Neural Language Models", table 1): a forward pass costs ``2 * N``
FLOPs per token for ``N`` non-embedding parameters, plus ``4 * n_layers * d_attn`` per token per earlier
token of context (QK^T and attention x V, causal). Achieved FLOP/s is either

- a preset: GPUs x 989.4 TFLOP/s (NVIDIA H100 SXM5 datasheet, dense BF16 tensor core peak) x MFU, with MFU
  (model FLOPs utilisation) 0.5 by default: an assumption, not a measurement; pass ``--mfu`` or
  ``--prefill-tps`` with your own figure; or
- measured (``--measure-prefill``): a randomly initialised transformer layer of the preset's exact width
  (attention with its query/KV heads, SwiGLU MLP) runs a prefill on this machine's accelerator (the CPU
  when there is none), and its FLOP/s replaces peak x MFU. One or two layers are timed and the rest are the
  same work, so the figure extrapolates exactly by layer count.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

import tierkv

__all__ = ["ModelPreset", "PRESETS", "PrefillModel", "H100_BF16_DENSE_FLOPS", "measure_prefill_flops"]

H100_BF16_DENSE_FLOPS = 989.4e12  # NVIDIA H100 SXM5 datasheet: BF16 tensor core, dense (989.4 TFLOPS)
DEFAULT_MFU = 0.5


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a decoder-only transformer, as far as KV bytes and prefill FLOPs go."""

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int          # SwiGLU MLP width
    params: float              # non-embedding parameters (Kaplan's N)
    gpus: int = 1              # GPUs one replica runs on (tensor parallel); prefill FLOP/s scale with it
    dtype: str = "bfloat16"
    source: str = ""

    def layout(self, block_tokens: int = 16) -> tierkv.KVLayout:
        return tierkv.KVLayout(num_layers=self.layers, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
                               block_tokens=block_tokens, dtype=self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=getattr(torch, self.dtype)
                                                                             ).element_size()

    def prefill_flops(self, start: int, end: int) -> float:
        """FLOPs to compute the KV (and hidden states) of tokens ``[start, end)`` given ``start`` cached ones."""
        if end <= start:
            return 0.0
        n = end - start
        d_attn = self.q_heads * self.head_dim
        # token t attends to t earlier tokens: sum over t in [start, end) of t = n * (start + end - 1) / 2
        context = n * (start + end - 1) / 2
        return 2.0 * self.params * n + 4.0 * self.layers * d_attn * context

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}


def _llama_params(layers: int, hidden: int, q_heads: int, kv_heads: int, head_dim: int, inter: int) -> float:
    """Non-embedding parameters of a Llama-style block stack (q, k, v, o projections + SwiGLU MLP)."""
    attn = hidden * q_heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    return float(layers * (attn + 3 * hidden * inter))


PRESETS: dict[str, ModelPreset] = {
    p.name: p for p in (
        ModelPreset("llama-3-8b", layers=32, q_heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336,
                    params=_llama_params(32, 4096, 32, 8, 128, 14336), gpus=1,
                    source="meta-llama/Meta-Llama-3-8B config.json"),
        ModelPreset("llama-3-70b", layers=80, q_heads=64, kv_heads=8, head_dim=128, hidden=8192, intermediate=28672,
                    params=_llama_params(80, 8192, 64, 8, 128, 28672), gpus=8,
                    source="meta-llama/Meta-Llama-3-70B config.json; 8 GPUs, tensor parallel"),
        ModelPreset("qwen2.5-7b", layers=28, q_heads=28, kv_heads=4, head_dim=128, hidden=3584, intermediate=18944,
                    params=_llama_params(28, 3584, 28, 4, 128, 18944), gpus=1,
                    source="Qwen/Qwen2.5-7B-Instruct config.json (GQA, 7 query heads per KV head)"),
    )
}


@dataclass(frozen=True)
class PrefillModel:
    """Recompute time of prompt tokens for one replica: FLOPs / ``flops_per_s`` (all the replica's GPUs)."""

    preset: ModelPreset
    flops_per_s: float
    how: str                   # how flops_per_s was obtained, for the report

    @classmethod
    def from_peak(cls, preset: ModelPreset, mfu: float = DEFAULT_MFU) -> "PrefillModel":
        if not 0 < mfu <= 1:
            raise ValueError(f"expected an MFU in (0, 1], got {mfu}")
        flops = preset.gpus * H100_BF16_DENSE_FLOPS * mfu
        return cls(preset, flops, f"{preset.gpus} x H100 SXM5 at 989.4 TFLOP/s dense BF16 (datasheet) x MFU {mfu:g}")

    @classmethod
    def from_tokens_per_s(cls, preset: ModelPreset, tokens_per_s: float, at_tokens: int = 2048) -> "PrefillModel":
        """From a measured prefill throughput of a ``at_tokens``-token prompt (the figure engines report)."""
        if tokens_per_s <= 0:
            raise ValueError(f"expected a positive prefill throughput, got {tokens_per_s}")
        flops = preset.prefill_flops(0, at_tokens) / (at_tokens / tokens_per_s)
        return cls(preset, flops, f"{tokens_per_s:g} prefill tokens/s at {at_tokens}-token prompts (given)")

    def seconds(self, start: int, end: int) -> float:
        return self.preset.prefill_flops(start, end) / self.flops_per_s

    def tokens_per_s(self, prompt_tokens: int = 2048) -> float:
        return prompt_tokens / self.seconds(0, prompt_tokens)

    def to_json(self) -> dict[str, Any]:
        return {"flops_per_s": self.flops_per_s, "how": self.how,
                "tokens_per_s_at_2048": self.tokens_per_s(2048)}


# --------------------------------------------------------------------------------------------- measured

class _Layer(torch.nn.Module):
    """One Llama-style decoder layer (RMSNorm, GQA attention, SwiGLU MLP); rotary embedding left out (it is
    element-wise and cheap next to the matrix products)."""

    def __init__(self, p: ModelPreset, dtype: torch.dtype, device: torch.device):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.p = p
        self.norm1 = torch.nn.RMSNorm(p.hidden, dtype=dtype, device=device)
        self.norm2 = torch.nn.RMSNorm(p.hidden, dtype=dtype, device=device)
        self.q = torch.nn.Linear(p.hidden, p.q_heads * p.head_dim, **kw)
        self.kv = torch.nn.Linear(p.hidden, 2 * p.kv_heads * p.head_dim, **kw)
        self.o = torch.nn.Linear(p.q_heads * p.head_dim, p.hidden, **kw)
        self.up = torch.nn.Linear(p.hidden, 2 * p.intermediate, **kw)
        self.down = torch.nn.Linear(p.intermediate, p.hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.p, x.shape[0]
        h = self.norm1(x)
        q = self.q(h).view(n, p.q_heads, p.head_dim).transpose(0, 1)
        k, v = self.kv(h).view(n, 2, p.kv_heads, p.head_dim).permute(1, 2, 0, 3)
        group = p.q_heads // p.kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(0, 1).reshape(n, -1))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(torch.nn.functional.silu(gate) * up)


def measure_prefill_flops(preset: ModelPreset, prompt_tokens: int = 1024, layers: int = 1,
                          device: torch.device | None = None, repeats: int = 2) -> tuple[float, dict[str, Any]]:
    """Achieved FLOP/s of a prefill of ``prompt_tokens`` through ``layers`` random layers of ``preset``'s width.

    On CUDA the layers run in bfloat16; on the CPU in float32 (CPU bf16 matrix products are often emulated and
    would understate what the CPU can do). Returns FLOP/s for one device, and a description for the report.
    """
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    one_layer = replace(preset, layers=1, params=preset.params / preset.layers)
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*(_Layer(preset, dtype, device) for _ in range(layers))).eval()
    x = torch.randn(prompt_tokens, preset.hidden, dtype=dtype, device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first run warms up kernels and allocators
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            stack(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
    flops = layers * one_layer.prefill_flops(0, prompt_tokens) / min(times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = {"device": name, "dtype": str(dtype).removeprefix("torch."), "layers_timed": layers,
            "prompt_tokens": prompt_tokens, "seconds": times, "flops_per_s": flops,
            "threads": torch.get_num_threads()}
    if not math.isfinite(flops) or flops <= 0:
        raise RuntimeError(f"expected a positive measured FLOP/s, got {flops}")
    return flops, info

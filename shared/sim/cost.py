"""The cost model: how long a prefill, a decode step and a KV transfer take, from a model spec and a node spec.

Prefill of a prompt of ``n`` tokens whose first ``p`` tokens hit the prefix cache (Mooncake FAST'25 eq. 1 in
roofline form; a hit skips both terms for the cached tokens)::

    pairs(n, p)   = Σ_{i=p}^{n-1} (i + 1) = (n(n+1) − p(p+1)) / 2          causal (query, key) pairs computed
    T_compute     = c0 + c1 · (n − p) + c2 · pairs(n, p)
    c1 = 2 · P_active / G          matmul FLOPs per new token over the effective FLOP rate G = n_gpus·peak·MFU
    c2 = F_pair / G                 F_pair = Σ_attention layers 2·H·(d_qk + d_v): FLOPs per (query, key) pair

Only full-attention layers pay ``c2``; a hybrid's linear-attention (KDA) layers cost a constant per token, which
sits inside ``c1`` through the active parameters. Cached blocks that live in host DRAM are loaded first::

    T_load = dram_blocks · block_bytes / B_h2d,      block_bytes = block_tokens · kv_bytes_per_token + state_bytes

and with layer-wise streaming (FAST'25 §3.1: layer ℓ's KV loads while layer ℓ−1 computes) the two overlap::

    T_prefill = max(T_load + T_compute / L,  T_load / L + T_compute)       (layer-wise, L layers)
    T_prefill = T_load + T_compute                                          (not layer-wise)

One decode step of a batch of ``B`` requests holding ``C`` context tokens in total reads every weight once, every
cached KV once and every recurrent state once (memory-bound; the per-token matmul FLOPs added on top)::

    T_step(B, C) = d0 + d1 · B + d2 · C
    d0 = overhead + W_bytes / BW,   d1 = 2·P_active / G_decode + 2·state_bytes / BW,   d2 = kv_bytes_per_token / BW

with ``BW = n_gpus · HBM bandwidth · MBU``. The additive form is an upper bound of the roofline ``max(memory,
compute)``; it keeps step times linear in ``B`` and ``C`` (the simulator advances decode in closed form) and
``calibrate`` refits all six coefficients to measured timings anyway.

A KV transfer of ``bytes`` over a path of links costs ``latency + bytes / min(bandwidth)``; streamed layer by
layer behind a compute of ``T_c`` it ends ``max(T_c + T_x / L, T_c / L + T_x)`` after the compute starts
(``transfer_end`` below adds queueing behind earlier transfers on the same links).

Presets: a Llama-3-70B-like dense model (GQA-8, 320 KB of KV per token, FAST'25 Table 1) and a
Kimi-Linear-48B-A3B-like hybrid (3:1 KDA:MLA, ~8 KB of KV per token plus a fixed KDA state), on H100/H800/H20/H200
nodes. Peak numbers are datasheet dense-bf16 figures; MFU/MBU are assumptions stated on each field.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "ModelSpec",
    "GPUSpec",
    "CostModel",
    "MODEL_PRESETS",
    "GPU_PRESETS",
    "gpu_preset",
    "layerwise_overlap",
    "transfer_end",
]


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs to know about a model (bytes are per token or per sequence, all layers)."""

    name: str
    n_layers: int
    active_params: float  # parameters used per token (FLOPs per token = 2 · active_params)
    weight_bytes: float  # bytes of weights read by one decode step (all experts of an MoE: large batches touch them)
    attn_flops_per_pair: float  # Σ over full-attention layers of 2·H·(d_qk + d_v)
    kv_bytes_per_token: float  # Σ over full-attention layers of the cached K/V (or MLA latent) bytes
    state_bytes: float = 0.0  # fixed per-sequence recurrent state (linear-attention layers); 0 for dense


@dataclass(frozen=True)
class GPUSpec:
    """One serving instance: ``n_gpus`` GPUs in tensor parallel plus the node's host memory and NIC."""

    name: str
    n_gpus: int
    flops: float  # dense bf16 FLOP/s per GPU (datasheet)
    hbm_bw: float  # bytes/s per GPU (datasheet)
    hbm_bytes: float  # bytes per GPU
    h2d_bw: float = 200e9  # host DRAM → HBM bytes/s for the node (8 × ~25 GB/s effective PCIe; assumption)
    nic_bw: float = 100e9  # RDMA bytes/s per node (4 × 200 Gbps, Mooncake's A800 nodes; its TE reaches 87 GB/s)
    nic_latency: float = 1e-4  # seconds per transfer (setup + first byte)
    dram_bytes: float = 1e12  # host DRAM given to the KVCache pool (FAST'25: ~1 TB ≈ 3M tokens of a 70B model)
    mfu: float = 0.5  # prefill model FLOPs utilisation (assumption)
    decode_mfu: float = 0.3  # matmul efficiency at decode batch sizes (assumption)
    mbu: float = 0.8  # decode memory-bandwidth utilisation (assumption)
    prefill_overhead: float = 0.02  # seconds per prefill (launch, scheduling, sampling)
    step_overhead: float = 0.003  # seconds per decode step (launch, TP all-reduces, sampling)
    hbm_reserve: float = 0.1  # fraction of HBM kept for activations and the allocator

    def kv_budget_bytes(self, model: ModelSpec) -> float:
        """HBM left for KV after weights and the reserve (raises when the weights do not fit)."""
        budget = self.n_gpus * self.hbm_bytes * (1.0 - self.hbm_reserve) - model.weight_bytes
        if budget <= 0:
            raise ValueError(
                f"gpu: {model.name} needs {model.weight_bytes / 1e9:.0f} GB of weights but {self.n_gpus}×{self.name} "
                f"hold {self.n_gpus * self.hbm_bytes * (1 - self.hbm_reserve) / 1e9:.0f} GB usable; use more GPUs"
            )
        return budget


def _gpu(name: str, flops: float, hbm_bw: float, hbm_bytes: float) -> GPUSpec:
    return GPUSpec(name=name, n_gpus=1, flops=flops, hbm_bw=hbm_bw, hbm_bytes=hbm_bytes)


# Datasheet dense bf16 FLOP/s, HBM bytes/s and bytes per GPU. H800 = H100 compute and HBM with cut NVLink; the
# simulator models nodes over RDMA, so the two differ only by the NIC default set in gpu_preset.
GPU_PRESETS: dict[str, GPUSpec] = {
    "h100": _gpu("h100", 989e12, 3.35e12, 80e9),
    "h800": _gpu("h800", 989e12, 3.35e12, 80e9),
    "h200": _gpu("h200", 989e12, 4.8e12, 141e9),
    "h20": _gpu("h20", 148e12, 4.0e12, 96e9),
}

_NIC = {"h100": 190e9, "h800": 87e9, "h200": 190e9, "h20": 87e9}  # Mooncake TE: 190 GB/s on 8×400G, 87 on 4×200G


def gpu_preset(name: str, n_gpus: int = 8, **overrides: float) -> GPUSpec:
    """A node of ``n_gpus`` GPUs of a preset kind (``h100``, ``h800``, ``h200``, ``h20``); fields overridable."""
    if name not in GPU_PRESETS:
        raise ValueError(f"name: expected one of {sorted(GPU_PRESETS)}, got {name!r}")
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n_gpus: expected a positive int, got {n_gpus!r}")
    base = replace(GPU_PRESETS[name], n_gpus=n_gpus, nic_bw=_NIC[name])
    return replace(base, **overrides)


def _dense_70b() -> ModelSpec:
    layers, heads, kv_heads, head_dim = 80, 64, 8, 128
    return ModelSpec(
        name="dense-70b",
        n_layers=layers,
        active_params=70.6e9,
        weight_bytes=70.6e9 * 2,
        attn_flops_per_pair=layers * 2 * heads * (head_dim + head_dim),
        kv_bytes_per_token=layers * 2 * kv_heads * head_dim * 2,  # 320 KB (FAST'25 Table 1)
    )


def _kimi_linear_48b() -> ModelSpec:
    # 27 layers, 3:1 KDA:MLA → 7 MLA layers caching a 512 + 64 latent per token, 20 KDA layers each holding a
    # 32-head 128×128 fp32 state. 48B total parameters (all read by a large decode batch), 3B active.
    mla, kda, heads = 7, 20, 32
    return ModelSpec(
        name="kimi-linear-48b-a3b",
        n_layers=mla + kda,
        active_params=3.0e9,
        weight_bytes=48e9 * 2,
        attn_flops_per_pair=mla * 2 * heads * (192 + 128),  # prefill MLA: q·k over 128+64 dims, p·v over 128
        kv_bytes_per_token=mla * (512 + 64) * 2,
        state_bytes=kda * heads * 128 * 128 * 4,
    )


MODEL_PRESETS: dict[str, ModelSpec] = {"dense-70b": _dense_70b(), "kimi-linear-48b-a3b": _kimi_linear_48b()}


def layerwise_overlap(first: float, second: float, n_layers: int, layerwise: bool = True) -> float:
    """Wall time of two per-layer stages where layer ℓ of ``second`` needs layer ℓ of ``first``.

    Each stage is split evenly over ``n_layers``; with streaming the stages pipeline, so the time is the longer
    stage plus one layer of the shorter: ``max(first + second/L, first/L + second)``; without, ``first + second``.
    """
    if not layerwise:
        return first + second
    return max(first + second / n_layers, first / n_layers + second)


def transfer_end(
    ready: float, compute: float, transfer: float, link_free: float, n_layers: int, layerwise: bool
) -> tuple[float, float]:
    """``(end, link_free')``: when a KV transfer behind a compute finishes, and the link's new backlog horizon.

    The compute starts at ``ready`` and lasts ``compute``; moving its output needs ``transfer`` seconds of a link
    whose queued transfers end at ``link_free``. The link is work-conserving: it serves ``transfer`` seconds
    after ``max(ready, link_free)``, so ``link_free' = max(ready, link_free) + transfer`` (a streamed transfer
    does not hold the link idle while it waits for layers). Layer-wise, layer ℓ leaves once computed, so::

        end = max(ready + max(compute + transfer/L, compute/L + transfer),  max(ready, link_free) + transfer)

    otherwise the transfer starts after the compute: ``end = max(ready + compute, link_free) + transfer`` and
    ``link_free' = end``.
    """
    if not layerwise:
        end = max(ready + compute, link_free) + transfer
        return end, end
    queued = max(ready, link_free) + transfer
    return max(ready + layerwise_overlap(compute, transfer, n_layers), queued), queued


def _pairs(n: float, p: float) -> float:
    return (n * (n + 1) - p * (p + 1)) / 2.0


def _nnls(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best fit over every subset of free columns."""
    best, best_err = np.zeros(features.shape[1]), float(np.sum(target**2))
    for k in range(1, features.shape[1] + 1):
        for cols in itertools.combinations(range(features.shape[1]), k):
            coef, *_ = np.linalg.lstsq(features[:, cols], target, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((features[:, cols] @ coef - target) ** 2))
            if err < best_err:
                best, best_err = np.zeros(features.shape[1]), err
                best[list(cols)] = coef
    return best


@dataclass(frozen=True)
class CostModel:
    """Coefficients of the three formulas in the module docstring, plus the sizes transfers need."""

    c0: float  # seconds per prefill
    c1: float  # seconds per new prompt token
    c2: float  # seconds per new causal (query, key) pair
    d0: float  # seconds per decode step
    d1: float  # seconds per request in the batch
    d2: float  # seconds per context token in the batch
    n_layers: int
    kv_bytes_per_token: float
    state_bytes: float
    h2d_bw: float
    block_tokens: int = 512

    @classmethod
    def from_specs(cls, model: ModelSpec, gpu: GPUSpec, block_tokens: int = 512) -> CostModel:
        """The roofline coefficients of ``model`` served by one ``gpu`` node (formulas in the module docstring)."""
        g_prefill = gpu.n_gpus * gpu.flops * gpu.mfu
        g_decode = gpu.n_gpus * gpu.flops * gpu.decode_mfu
        bw = gpu.n_gpus * gpu.hbm_bw * gpu.mbu
        return cls(
            c0=gpu.prefill_overhead,
            c1=2.0 * model.active_params / g_prefill,
            c2=model.attn_flops_per_pair / g_prefill,
            d0=gpu.step_overhead + model.weight_bytes / bw,
            d1=2.0 * model.active_params / g_decode + 2.0 * model.state_bytes / bw,
            d2=model.kv_bytes_per_token / bw,
            n_layers=model.n_layers,
            kv_bytes_per_token=model.kv_bytes_per_token,
            state_bytes=model.state_bytes,
            h2d_bw=gpu.h2d_bw,
            block_tokens=block_tokens,
        )

    @property
    def block_bytes(self) -> float:
        """Bytes of one cached block: its tokens' KV plus a recurrent-state checkpoint (hybrids) to resume from."""
        return self.block_tokens * self.kv_bytes_per_token + self.state_bytes

    def kv_transfer_bytes(self, n_tokens: int) -> float:
        """Bytes a prefill hands to decode: every token's KV plus the final recurrent state."""
        return n_tokens * self.kv_bytes_per_token + self.state_bytes

    def prefill_compute(self, n: int, p: int) -> float:
        """``T_compute(n, p)``: seconds to prefill tokens ``p..n−1`` given the first ``p`` cached."""
        return self.c0 + self.c1 * (n - p) + self.c2 * _pairs(n, p)

    def load_time(self, dram_blocks: int) -> float:
        """Seconds to bring ``dram_blocks`` cached blocks from host DRAM into HBM."""
        return dram_blocks * self.block_bytes / self.h2d_bw

    def prefill_time(self, n: int, p: int, dram_blocks: int = 0, layerwise: bool = True) -> float:
        """``T_prefill``: the DRAM load of cached blocks overlapped (layer-wise) with the compute."""
        return layerwise_overlap(self.load_time(dram_blocks), self.prefill_compute(n, p), self.n_layers, layerwise)

    def decode_step(self, batch: int, context_tokens: int) -> float:
        """``T_step(B, C)``: seconds of one decode step producing one token for each of ``batch`` requests."""
        return self.d0 + self.d1 * batch + self.d2 * context_tokens

    def calibrate(
        self,
        prefill_samples: Sequence[tuple[int, int, float]] = (),
        decode_samples: Sequence[tuple[int, int, float]] = (),
    ) -> CostModel:
        """Refit the coefficients to measured timings (the hook a live engine feeds).

        ``prefill_samples`` are ``(n, p, seconds)``, ``decode_samples`` are ``(batch, context_tokens, seconds)``;
        each family is fitted by non-negative least squares on its features ``[1, n−p, pairs(n, p)]`` or
        ``[1, B, C]`` and left unchanged when no samples are given. Needs ≥ 3 samples per family fitted.
        """
        out = self
        if prefill_samples:
            x = np.asarray(prefill_samples, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != 3 or len(x) < 3:
                raise ValueError(f"prefill_samples: expected >= 3 (n, p, seconds) rows, got shape {x.shape}")
            if np.any(x[:, 1] < 0) or np.any(x[:, 1] >= x[:, 0]) or np.any(x[:, 2] <= 0) or not np.all(np.isfinite(x)):
                raise ValueError("prefill_samples: expected 0 <= p < n and finite seconds > 0 in every row")
            feats = np.stack([np.ones(len(x)), x[:, 0] - x[:, 1], _pairs(x[:, 0], x[:, 1])], axis=1)
            c = _nnls(feats, x[:, 2])
            out = replace(out, c0=float(c[0]), c1=float(c[1]), c2=float(c[2]))
        if decode_samples:
            x = np.asarray(decode_samples, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != 3 or len(x) < 3:
                raise ValueError(
                    f"decode_samples: expected >= 3 (batch, context_tokens, seconds) rows, got shape {x.shape}"
                )
            if np.any(x[:, 0] < 1) or np.any(x[:, 1] < 0) or np.any(x[:, 2] <= 0) or not np.all(np.isfinite(x)):
                raise ValueError("decode_samples: expected batch >= 1, context_tokens >= 0, finite seconds > 0")
            feats = np.stack([np.ones(len(x)), x[:, 0], x[:, 1]], axis=1)
            d = _nnls(feats, x[:, 2])
            out = replace(out, d0=float(d[0]), d1=float(d[1]), d2=float(d[2]))
        return out

    def reuse_break_even_bw(self, p: int) -> float:
        """Bytes/s above which loading a ``p``-token prefix beats recomputing it (FAST'25 §2.2 in our terms).

        Reuse wins iff ``p · kv_bytes / B < T_compute(p, 0) − c0``, i.e. ``B > p · kv_bytes / (c1·p + c2·pairs(p, 0))``.
        """
        if p < 1:
            raise ValueError(f"p: expected a prefix of >= 1 token, got {p}")
        return p * self.kv_bytes_per_token / (self.c1 * p + self.c2 * _pairs(p, 0))

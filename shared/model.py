"""TinyKimi: a small Kimi-Linear-style language model composed from chapters 01–05.

One layer = a sequence mixer sublayer and a feed-forward sublayer, each with its own pre-norm::

    v_mixer = mixer(RMSNorm(h))            mixer ∈ {K: Kimi Delta Attention (03), M: MoBA (02), A: dense attention}
    v_ffn   = ffn(RMSNorm(h'))             ffn   ∈ {dense SwiGLU, K2-style MoE (05) after the first k layers}

and the residual stream (04) decides what each sublayer reads: ``standard`` (h_{l+1} = h_l + v_l), ``full``
(h_l = softmax-over-depth mix of the embedding and all earlier sublayer outputs) or ``block`` (the same over
block summaries). The layer pattern is a string repeated to ``n_layers`` (``"KKKM"``: Kimi Linear's 3 KDA : 1
attention). Logits = lm_head(RMSNorm(h_final)).

Everything chapter-specific is imported from the chapters' public modules; this file only wires them. The
sequence mixers share one contract, ``mixer(x [B, T, D], cache: dict | None) -> [B, T, D]``: with a cache dict
the layer continues from the state in it (KDA's recurrent state, attention's KV cache) and writes it back,
which is what ``generate`` uses. Attention mixers (``M`` and ``A``) record their per-head maximum
pre-softmax logit when ``track_max_logits`` is on; ``max_logits()`` returns them by module name for QK-clip.

Hooks for later chapters: every sublayer is a module (``model.layers[i].mixer``, ``model.layers[i].ffn``), so
a PyTorch forward hook on it sees (and may replace) that sublayer's output ``v`` before the residual stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nanokimi.attnres.layer import ResidualStream
from nanokimi.checks import check_in, check_positive_int
from nanokimi.data import TOKENIZER
from nanokimi.kda.layer import KimiDeltaAttention
from nanokimi.moba.layer import MoBAAttention
from nanokimi.moe.layer import MoE

__all__ = ["TinyKimiConfig", "TinyKimi", "SwiGLU", "PRESETS", "LAYER_KINDS"]

LAYER_KINDS = {"K": "Kimi Delta Attention", "M": "MoBA attention", "A": "dense causal attention"}
RESIDUAL_MODES = ("standard", "full", "block")
FFN_KINDS = ("dense", "moe")
BACKENDS = ("reference", "triton")


@dataclass
class TinyKimiConfig:
    """Everything that defines a TinyKimi's shape. ``pattern`` is repeated (and cut) to ``n_layers`` layers."""

    vocab_size: int = TOKENIZER.vocab_size
    d_model: int = 128
    n_heads: int = 4
    head_dim: int | None = None  # None: d_model // n_heads
    n_layers: int = 4
    pattern: str = "KKKM"
    residual: str = "block"
    attnres_block_size: int = 4  # sublayers per block (2 per layer) when residual == "block"
    ffn: str = "moe"
    d_ff: int = 256  # dense SwiGLU hidden size
    moe_d_ff: int = 128  # hidden size of each expert
    n_experts: int = 4
    moe_top_k: int = 2
    n_shared_experts: int = 1
    first_k_dense: int = 1  # the first k layers keep a dense FFN (as K2 and Kimi Linear do)
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3
    moba_block_size: int = 8
    moba_topk: int = 2
    kda_conv_size: int = 4
    kda_chunk_size: int = 8  # chunk C of the chunkwise form: its pairwise-decay work is T·C·K, so small C on a CPU
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    backend: str = "reference"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "attnres_block_size", "d_ff", "moe_d_ff"):
            check_positive_int(name, getattr(self, name))
        for name in ("n_experts", "moe_top_k", "moba_block_size", "moba_topk", "kda_conv_size", "kda_chunk_size"):
            check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"n_heads: expected a divisor of d_model={self.d_model} (or pass head_dim), got {self.n_heads}"
                )
        else:
            check_positive_int("head_dim", self.head_dim)
        if not self.pattern or set(self.pattern) - set(LAYER_KINDS):
            raise ValueError(f"pattern: expected a non-empty string over {sorted(LAYER_KINDS)}, got {self.pattern!r}")
        check_in("residual", self.residual, RESIDUAL_MODES)
        check_in("ffn", self.ffn, FFN_KINDS)
        check_in("backend", self.backend, BACKENDS)
        if self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k: expected at most n_experts={self.n_experts}, got {self.moe_top_k}")
        if isinstance(self.first_k_dense, bool) or not isinstance(self.first_k_dense, int) or self.first_k_dense < 0:
            raise ValueError(f"first_k_dense: expected an int >= 0, got {self.first_k_dense!r}")
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int):
            raise ValueError(f"n_shared_experts: expected an int >= 0, got {self.n_shared_experts!r}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts: expected an int >= 0, got {self.n_shared_experts}")

    @property
    def layer_kinds(self) -> str:
        """One letter per layer: the pattern repeated and cut to ``n_layers``."""
        return (self.pattern * math.ceil(self.n_layers / len(self.pattern)))[: self.n_layers]

    def ffn_kind(self, layer: int) -> str:
        return "moe" if self.ffn == "moe" and layer >= self.first_k_dense else "dense"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinyKimiConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> TinyKimiConfig:
        """A named preset (``cpu-tiny``, ``gpu-small``) with optional field overrides."""
        check_in("preset", name, list(PRESETS))
        return cls.from_dict(PRESETS[name] | overrides)


PRESETS: dict[str, dict] = {
    # Trains on a shared 2-core CPU in minutes: the 3:1 KDA/MoBA hybrid, Block AttnRes, MoE after layer 0.
    "cpu-tiny": {},
    # Sized for one H100 with the Triton backends: head_dim 128 (the kernels' sweet spot), 64-token MoBA blocks.
    "gpu-small": {
        "d_model": 1024,
        "n_heads": 8,
        "n_layers": 8,
        "attnres_block_size": 4,
        "d_ff": 2816,
        "moe_d_ff": 704,
        "n_experts": 16,
        "moe_top_k": 4,
        "routed_scaling_factor": 2.0,
        "moba_block_size": 64,
        "moba_topk": 4,
        "kda_chunk_size": 64,
        "backend": "triton",
    },
}


class SwiGLU(nn.Module):
    """Dense FFN: ``w_down(silu(w_gate x) ⊙ w_up x)``, [..., D] → [..., D]."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """One layer: a pre-normed sequence mixer and a pre-normed FFN (two sublayers of the residual stream)."""

    def __init__(self, cfg: TinyKimiConfig, index: int):
        super().__init__()
        self.kind = cfg.layer_kinds[index]
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if self.kind == "K":
            self.mixer = KimiDeltaAttention(
                cfg.d_model,
                cfg.n_heads,
                head_dim=cfg.head_dim,
                conv_size=cfg.kda_conv_size,
                backend=cfg.backend,
                chunk_size=cfg.kda_chunk_size,
            )
        else:
            self.mixer = MoBAAttention(
                cfg.d_model,
                cfg.n_heads,
                head_dim=cfg.head_dim,
                block_size=cfg.moba_block_size,
                topk=cfg.moba_topk,
                rope_base=cfg.rope_base,
                dense=self.kind == "A",
                backend=cfg.backend,
            )
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.ffn_kind(index) == "moe":
            self.ffn = MoE(
                cfg.d_model,
                cfg.moe_d_ff,
                cfg.n_experts,
                cfg.moe_top_k,
                n_shared=cfg.n_shared_experts,
                routed_scaling_factor=cfg.routed_scaling_factor,
                bias_update_rate=cfg.bias_update_rate,
                backend=cfg.backend,
            )
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)

    def mixer_sublayer(self, h: torch.Tensor, cache: dict | None) -> torch.Tensor:
        return self.mixer(self.mixer_norm(h), cache=cache)

    def ffn_sublayer(self, h: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ffn_norm(h))


class TinyKimi(nn.Module):
    """The model. ``forward(tokens [B, T]) -> (logits [B, T, V], loss or None)``; see the module docstring."""

    def __init__(self, cfg: TinyKimiConfig):
        super().__init__()
        if not isinstance(cfg, TinyKimiConfig):
            raise TypeError(f"cfg: expected a TinyKimiConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.residual = ResidualStream(
            cfg.residual,
            2 * cfg.n_layers,
            cfg.d_model,
            block_size=cfg.attnres_block_size if cfg.residual == "block" else None,
            backend=cfg.backend,
        )
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Small output weights keep the first logits near uniform (loss ≈ log V at step 0). A tied matrix serves
        # both ends, so it gets std d^-1/2: unit-scale logits from unit-RMS hidden states.
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if cfg.tie_embeddings:
            nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)
            self.lm_head.weight = self.embed.weight
        self._rms_record: list[float] | None = None

    # --- forward ------------------------------------------------------------------------------------------
    def _sublayers(self, caches: Sequence[dict] | None) -> list:
        """The 2·n_layers callables ``h_l -> v_l`` the residual stream calls, in depth order."""

        def recorded(fn):
            def call(h: torch.Tensor) -> torch.Tensor:
                if self._rms_record is not None:
                    self._rms_record.append(float(h.detach().float().pow(2).mean().sqrt()))
                return fn(h)

            return call

        fns = []
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            fns.append(recorded(lambda h, layer=layer, cache=cache: layer.mixer_sublayer(h, cache)))
            fns.append(recorded(layer.ffn_sublayer))
        return fns

    def hidden_states(self, tokens: torch.Tensor, caches: Sequence[dict] | None = None) -> torch.Tensor:
        """``RMSNorm(h_final)``: [B, T] token ids → [B, T, D], the input of ``lm_head``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            shown = f"{tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else tokens
            raise ValueError(f"tokens: expected an int64 tensor [B, T], got {shown}")
        if bool(((tokens < 0) | (tokens >= self.cfg.vocab_size)).any()):  # one host sync
            raise ValueError(
                f"tokens: expected ids in [0, {self.cfg.vocab_size}), got min {int(tokens.min())} max {int(tokens.max())}"
            )
        if caches is not None and len(caches) != self.cfg.n_layers:
            raise ValueError(f"caches: expected {self.cfg.n_layers} dicts (one per layer), got {len(caches)}")
        x = self.embed(tokens)  # [B, T, D]
        h = self.residual(x, self._sublayers(caches))  # [B, T, D]
        return self.final_norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        caches: Sequence[dict] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] and, with ``targets``, the mean cross-entropy over ``loss_mask`` (all when None)."""
        logits = self.lm_head(self.hidden_states(tokens, caches))  # [B, T, V]
        if targets is None:
            return logits, None
        if targets.shape != tokens.shape:
            raise ValueError(
                f"targets: expected shape {tuple(tokens.shape)} (that of tokens), got {tuple(targets.shape)}"
            )
        if loss_mask is None:
            loss_mask = torch.ones_like(targets, dtype=torch.bool)
        if loss_mask.shape != tokens.shape or loss_mask.dtype != torch.bool:
            raise ValueError(
                f"loss_mask: expected a bool tensor of shape {tuple(tokens.shape)}, got {loss_mask.dtype} {tuple(loss_mask.shape)}"
            )
        if not bool(loss_mask.any()):
            raise ValueError("loss_mask: selects no token, so the loss is undefined")
        loss = F.cross_entropy(logits[loss_mask].float(), targets[loss_mask])
        return logits, loss

    def new_caches(self) -> list[dict]:
        """One empty cache dict per layer ("no tokens yet"), for incremental decoding."""
        return [{} for _ in self.layers]

    # --- what the trainer and later chapters use ---------------------------------------------------------
    def attention_modules(self) -> dict[str, nn.Module]:
        """Softmax-attention mixers (``M`` and ``A`` layers) by module name, e.g. ``"layers.3.mixer"``."""
        return {f"layers.{i}.mixer": layer.mixer for i, layer in enumerate(self.layers) if layer.kind in "MA"}

    def track_max_logits(self, on: bool = True) -> None:
        """Make the attention mixers record their per-head max logit on each forward (for QK-clip)."""
        for module in self.attention_modules().values():
            module.track_max_logits = on

    def max_logits(self) -> dict[str, torch.Tensor]:
        """Per-head max pre-softmax logit [n_heads] of each attention mixer, from the last tracked forward."""
        return {
            name: m.max_logits
            for name, m in self.attention_modules().items()
            if getattr(m, "max_logits", None) is not None
        }

    def moe_modules(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def update_moe_biases(self) -> None:
        """Aux-loss-free balancing: each MoE layer's bias update from the loads since the last call."""
        for moe in self.moe_modules():
            moe.update_bias()

    @torch.no_grad()
    def sublayer_input_rms(self, tokens: torch.Tensor) -> list[float]:
        """RMS of ``h_l``, the input each of the 2·n_layers sublayers reads (PreNorm dilution made visible)."""
        self._rms_record = []
        try:
            self.hidden_states(tokens)
            return self._rms_record
        finally:
            self._rms_record = None

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """The layer pattern as a diagram, with parameter counts per part."""
        cfg = self.cfg

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        residual = {
            "standard": "standard residual  h ← h + v",
            "full": "Full AttnRes  h_l = Σ_i α_i→l v_i over all earlier sublayers",
            "block": f"Block AttnRes  blocks of {cfg.attnres_block_size} sublayers",
        }[cfg.residual]
        lines = [
            f"TinyKimi  d_model={cfg.d_model} heads={cfg.n_heads} layers={cfg.n_layers} pattern={cfg.pattern!r} "
            f"backend={cfg.backend}",
            f"  residual stream: {residual}",
            f"  embed {cfg.vocab_size}×{cfg.d_model}{' (tied with lm_head)' if cfg.tie_embeddings else ''}"
            f"{count(self.embed):>14,}",
        ]
        for i, layer in enumerate(self.layers):
            if layer.kind == "M":
                mixer = f"MoBA b={cfg.moba_block_size} top{cfg.moba_topk}"
            else:
                mixer = {"K": "KDA", "A": "dense attention"}[layer.kind]
            if isinstance(layer.ffn, MoE):
                ffn = f"MoE {cfg.n_experts}×top{cfg.moe_top_k}+{cfg.n_shared_experts} shared"
            else:
                ffn = "SwiGLU"
            lines.append(f"  layer {i:2d} [{layer.kind}] {mixer:<18} → {ffn:<22}{count(layer):>12,}")
        head = 0 if cfg.tie_embeddings else count(self.lm_head)
        lines.append(f"  final RMSNorm → lm_head{head:>38,}")
        lines.append(f"  total parameters: {self.num_parameters():,}")
        return "\n".join(lines)

    # --- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | Sequence[int] = 0,
        eos_id: int | None = TOKENIZER.eos_id,
    ) -> list[list[int]]:
        """Sample continuations of a batch of prompts with per-layer caches.

        prompts: token-id lists (any lengths; prompts of one length are decoded together as one batch, so no
        padding ever enters a state) or an int64 tensor [B, T]. Each row stops after ``eos_id`` (kept in the
        output) or ``max_new_tokens``. ``temperature = 0`` is greedy; otherwise logits/temperature, restricted to
        the ``top_k`` largest when given, are sampled by the Gumbel-max trick.

        Randomness: row r's token at absolute position p (prompt length + index) uses Gumbel noise from a
        generator seeded by (seed, r, p) for an int ``seed``, or by (seed[r], p) with one seed per row. With
        per-row seeds a sample is independent of batching, and continuing a prompt + partial response with the
        same seed gives the same tokens as the uninterrupted sample (what partial rollouts need).
        """
        rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(map(int, p)) for p in prompts]
        if not rows:
            raise ValueError("prompts: expected at least one prompt, got none")
        for r, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompts: prompt {r} is empty (start it with <bos>)")
            if min(row) < 0 or max(row) >= self.cfg.vocab_size:
                raise ValueError(f"prompts: prompt {r} has ids outside [0, {self.cfg.vocab_size})")
        check_positive_int("max_new_tokens", max_new_tokens)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
        if top_k is not None:
            check_positive_int("top_k", top_k)
        if isinstance(seed, int):
            streams = [(seed, r) for r in range(len(rows))]
        else:
            if len(seed) != len(rows):
                raise ValueError(f"seed: expected an int or one seed per prompt ({len(rows)}), got {len(seed)}")
            streams = [(int(s),) for s in seed]

        was_training = self.training
        self.eval()
        try:
            out: list[list[int]] = [[] for _ in rows]
            by_length: dict[int, list[int]] = {}
            for r, row in enumerate(rows):
                by_length.setdefault(len(row), []).append(r)
            for idx in by_length.values():
                done = self._generate_same_length(
                    [rows[r] for r in idx], [streams[r] for r in idx], max_new_tokens, temperature, top_k, eos_id
                )
                for r, tokens in zip(idx, done, strict=True):
                    out[r] = tokens
            return out
        finally:
            self.train(was_training)

    def _generate_same_length(self, rows, streams, max_new_tokens, temperature, top_k, eos_id) -> list[list[int]]:
        device = self.embed.weight.device
        tokens = torch.tensor(rows, dtype=torch.long, device=device)  # [b, L]
        caches = self.new_caches()
        logits, _ = self(tokens, caches=caches)  # prefill
        next_logits = logits[:, -1].float()  # [b, V]
        out: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        for i in range(max_new_tokens):
            chosen = self._pick(next_logits, temperature, top_k, streams, tokens.shape[1] + i)  # [b]
            for r, tok in enumerate(chosen.tolist()):
                if not finished[r]:
                    out[r].append(tok)
                    finished[r] = eos_id is not None and tok == eos_id
            if all(finished) or i == max_new_tokens - 1:
                break
            logits, _ = self(chosen[:, None], caches=caches)  # decode one token
            next_logits = logits[:, -1].float()
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, streams, position: int) -> torch.Tensor:
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature == 0:
            return logits.argmax(dim=-1)
        noise = []
        for stream in streams:
            state = np.random.SeedSequence([*stream, position]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            u = torch.rand(logits.shape[-1], generator=gen, dtype=torch.float64).clamp_(min=1e-300)
            noise.append(-torch.log(-torch.log(u)))  # Gumbel(0, 1)
        gumbel = torch.stack(noise).to(logits.device)  # [b, V]
        return (logits.double() / temperature + gumbel).argmax(dim=-1)

"""Muon (with Moonlight's update scaling), the parameter split, and the Muon + AdamW hybrid optimizer.

Per Muon parameter ``W: [A, B]`` (or a stack of E expert matrices ``[E, A, B]``, each orthogonalised on its own)
one step is (``reference.muon_step_reference``)::

    M ← β·M + (1 − β)·G;   U = (1 − β)·G + β·M  (Nesterov) or M
    O = NS₅(U)                                    per matrix, ≈ U Vᵀ of U = U Σ Vᵀ
    W ← (1 − η·λ)·W − η·s(A, B)·O                 s = 0.2·√max(A, B) ("match_rms_adamw"), √max(1, A/B), or 1

``backend="triton"`` runs the same math with fused kernels: one pass for the momentum (and the norm of U), one
pass writing U/‖U‖_F in bf16 straight into a batch buffer that holds every matrix of the same shape, the
symmetric Newton–Schulz kernels once per shape (one launch per kernel for the whole batch), one pass for the
update. ``backend="reference"`` calls the plain-torch reference per parameter.

Distributed (torch.distributed initialised, world size > 1): gradients are assumed already averaged (DDP).
Every rank updates every momentum buffer (cheap, and it keeps optimizer states identical for checkpoints), but
only the owner of a parameter — rank ``i mod world_size`` for the i-th Muon parameter — runs its Newton–Schulz;
the owner then broadcasts the orthogonalised update and every rank applies it. The result is the
single-process step, with the NS work divided by the world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nanokimi.checks import check_in, check_positive_int
from nanokimi.muon import reference
from nanokimi.muon.kernels import (
    apply_update_triton,
    compute_dtype,
    momentum_triton,
    newton_schulz_iterate_triton,
    normalize_update_triton,
)
from nanokimi.muon.reference import ADJUST_LR_MODES, DEFAULT_COEFFICIENTS, lr_adjustment
from nanokimi.triton_utils import ensure_cuda_or_interpreter

__all__ = ["Muon", "MuonWithAdamW", "muon_param_groups"]

BACKENDS = ("reference", "triton")
NS_EPS = 1e-7  # ‖U‖_F below this: the update shrinks to 0 instead of dividing by ~0 (a zero gradient gives 0)

# 2-D weights that are not hidden matrices: lookup tables (by type or by a name segment "embed*") and the output
# classifier "lm_head". Normalisation gains go by class name ("*Norm"), in case one is 2-D (per-head gains).
_ADAMW_MODULES = (nn.Embedding, nn.EmbeddingBag)
_EMBED_PREFIX, _HEAD_NAME = "embed", "lm_head"


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _param_name(group: dict, i: int, group_index: int) -> str:
    names = group.get("param_names")
    return repr(names[i]) if names else f"param_groups[{group_index}]['params'][{i}]"


def _check_number(name: str, value: Any, low: float, high: float | None = None, high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bound = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        raise ValueError(f"{name}: expected a finite number >= {low}{bound}, got {value!r}")


def _check_finite_grads(groups: list[dict]) -> None:
    """Raise before any state changes when a gradient holds NaN/inf (one fused max-abs pass, one sync)."""
    named = [
        (p.grad, gi, i, group)
        for gi, group in enumerate(groups)
        for i, p in enumerate(group["params"])
        if p.grad is not None
    ]
    if not named:
        return
    # ord=inf (max |g|) cannot overflow for finite gradients, unlike the sum of squares
    max_abs = torch._foreach_norm([g for g, *_ in named], ord=math.inf)
    device = max_abs[0].device
    finite = torch.stack([torch.isfinite(n).to(device) for n in max_abs])
    if not bool(finite.all()):  # the step's one host sync
        _, gi, i, group = named[int((~finite).nonzero()[0])]
        shape = tuple(group["params"][i].shape)
        raise ValueError(
            f"grad of {_param_name(group, i, gi)} (shape {shape}): expected finite values, got NaN/inf; "
            "no parameter or optimizer state was changed (skip this step or lower the learning rate)"
        )


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices ``[A, B]`` and stacks of independent matrices ``[E, A, B]`` (MoE experts).

    Args:
        params: tensors, ``(name, tensor)`` pairs (names appear in errors) or param-group dicts. Every tensor must
            be 2-D or 3-D; anything else raises ValueError naming it: send vectors, embeddings and the output
            head to AdamW (``muon_param_groups`` / ``MuonWithAdamW``).
        lr: η. With ``adjust_lr="match_rms_adamw"`` use AdamW's learning rate.
        weight_decay: λ, decoupled, multiplied by the unadjusted η (Moonlight Eq. 3).
        momentum: β of the EMA momentum ``M ← β·M + (1 − β)·G``.
        nesterov: use the look-ahead ``(1 − β)·G + β·M`` instead of ``M``.
        ns_steps: Newton–Schulz steps (5 in every paper).
        adjust_lr: ``"match_rms_adamw"`` (0.2·√max(A, B)), ``"original"`` (√max(1, A/B)) or None.
        backend: ``"triton"`` (fused kernels; bf16 Newton–Schulz on the GPU) or ``"reference"`` (plain torch).

    A NaN/inf gradient raises ValueError before anything is modified. ``state_dict()`` holds one
    ``momentum_buffer`` per parameter and round-trips through ``load_state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str | None = "match_rms_adamw",
        backend: str = "triton",
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr=adjust_lr,
        )
        self._setup(params, defaults, backend)

    def _setup(self, params: Iterable[Any], defaults: dict, backend: str) -> None:
        if isinstance(params, nn.Module):
            raise TypeError("params: expected parameters or param groups, got an nn.Module (use muon_param_groups)")
        check_in("backend", backend, BACKENDS)
        self.backend = backend
        self._check_hparams("defaults", defaults)
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)

    def _check_hparams(self, where: str, group: dict) -> None:
        _check_number(f"{where}: lr", group["lr"], 0.0)
        _check_number(f"{where}: weight_decay", group["weight_decay"], 0.0)
        _check_number(f"{where}: momentum", group["momentum"], 0.0, 1.0, high_open=True)
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"{where}: nesterov: expected a bool, got {group['nesterov']!r}")
        check_positive_int(f"{where}: ns_steps", group["ns_steps"])
        check_in(f"{where}: adjust_lr", group["adjust_lr"], ADJUST_LR_MODES)

    def _check_group(self, gi: int, group: dict) -> None:
        if group.get("use_muon", True) is not True:
            raise ValueError(
                f"param_groups[{gi}]: expected Muon parameters, got a group with use_muon={group.get('use_muon')!r} "
                "(MuonWithAdamW steps both kinds)"
            )
        self._check_hparams(f"param_groups[{gi}]", group)
        self._check_matrices(gi, group)

    def _check_matrices(self, gi: int, group: dict) -> None:
        for i, p in enumerate(group["params"]):
            name = _param_name(group, i, gi)
            if p.dim() not in (2, 3):
                raise ValueError(
                    f"{name}: Muon expects a 2-D matrix [A, B] or a 3-D stack of matrices [E, A, B], got shape "
                    f"{tuple(p.shape)}; optimise it with AdamW (see muon_param_groups)"
                )
            if not p.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point parameter, got {p.dtype}")
            if self.backend == "triton":
                ensure_cuda_or_interpreter(p, names=(name,))
                if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                    raise TypeError(f"{name}: backend='triton' expects fp32/bf16/fp16 parameters, got {p.dtype}")
                if not p.is_contiguous():
                    raise ValueError(
                        f"{name}: backend='triton' expects a contiguous parameter, got strides {p.stride()}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step on every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_finite_grads(self.param_groups)
        self._muon_update(self.param_groups)
        return loss

    def _muon_update(self, groups: list[dict]) -> None:
        rank, world = _world()
        items = []  # (global Muon-parameter index, param, group): the index decides the owner rank
        index = 0
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    items.append((index, p, group))
                index += 1
        if not items:
            return
        owned = [item for item in items if item[0] % world == rank]
        if self.backend == "triton":
            updates = self._orthogonalize_triton(items, owned)
        else:
            updates = self._orthogonalize_reference(items, owned)
        if world > 1:
            self._broadcast_updates(items, updates, world)
        for index, p, group in items:
            lr, scale = group["lr"], lr_adjustment(p.shape, group["adjust_lr"])
            if self.backend == "triton":
                apply_update_triton(p, updates[index], 1 - lr * group["weight_decay"], lr * scale)
            else:
                reference.muon_apply(p, updates[index], lr, group["weight_decay"], scale)

    def _orthogonalize_reference(self, items: list, owned: list) -> dict[int, torch.Tensor]:
        owned_indices = {index for index, _, _ in owned}
        updates = {}
        for index, p, group in items:  # every rank keeps every momentum buffer
            buf = self.state[p]["momentum_buffer"]
            lookahead = reference.muon_momentum(p.grad, buf, group["momentum"], group["nesterov"])
            if index in owned_indices:
                updates[index] = reference.newton_schulz(lookahead, group["ns_steps"], DEFAULT_COEFFICIENTS, NS_EPS)
        return updates

    def _orthogonalize_triton(self, items: list, owned: list) -> dict[int, torch.Tensor]:
        partials = {}
        for index, p, group in items:  # every rank keeps every momentum buffer
            buf = self.state[p]["momentum_buffer"]
            partials[index] = momentum_triton(p.grad.contiguous(), buf, group["momentum"], group["nesterov"])
        # one batch buffer per (matrix shape, steps, device): all those matrices share each kernel launch
        buckets: dict[tuple, list] = {}
        for item in owned:
            _, p, group = item
            buckets.setdefault((tuple(p.shape[-2:]), group["ns_steps"], p.device), []).append(item)
        updates = {}
        for (shape, steps, device), bucket in buckets.items():
            counts = [1 if p.dim() == 2 else p.shape[0] for _, p, _ in bucket]
            X = torch.empty((sum(counts), *shape), device=device, dtype=compute_dtype())  # [Σ E, A, B]
            offsets = [sum(counts[:k]) for k in range(len(counts))]
            for (index, p, group), off, count in zip(bucket, offsets, counts, strict=True):
                normalize_update_triton(
                    p.grad.contiguous(),
                    self.state[p]["momentum_buffer"],
                    partials[index],
                    group["momentum"],
                    group["nesterov"],
                    NS_EPS,
                    out=X[off : off + count],
                )
            ortho = newton_schulz_iterate_triton(X, steps, DEFAULT_COEFFICIENTS)
            for (index, p, _), off, count in zip(bucket, offsets, counts, strict=True):
                updates[index] = ortho[off : off + count].view(p.shape)
        return updates

    def _broadcast_updates(self, items: list, updates: dict[int, torch.Tensor], world: int) -> None:
        """Every rank receives each orthogonalised update from its owner (all collectives issued in one order)."""
        works = []
        for index, p, _ in items:
            if index not in updates:  # owned by another rank: receive it
                dtype = compute_dtype() if self.backend == "triton" else p.dtype
                updates[index] = torch.empty(p.shape, device=p.device, dtype=dtype)
            works.append(dist.broadcast(updates[index], src=index % world, async_op=True))
        for work in works:
            work.wait()


class MuonWithAdamW(Muon):
    """One optimizer for a whole model: Muon on the groups with ``use_muon=True``, AdamW on the others.

    Build it from ``muon_param_groups(model)``. Both halves share ``lr`` and ``weight_decay`` (Moonlight: with
    ``adjust_lr="match_rms_adamw"`` Muon's update RMS matches AdamW's, so one schedule drives both). AdamW::

        m ← β₁·m + (1 − β₁)·g;   v ← β₂·v + (1 − β₂)·g²
        W ← (1 − η·λ)·W − η·(m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

    The AdamW half runs in plain torch whatever the backend (it is not this chapter's subject); in a distributed
    run every rank applies it to its replica, as DDP expects.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str | None = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        backend: str = "triton",
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr=adjust_lr,
            betas=betas,
            eps=eps,
        )
        self._setup(params, defaults, backend)

    def _check_hparams(self, where: str, group: dict) -> None:
        super()._check_hparams(where, group)
        betas = group["betas"]
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"{where}: betas: expected two numbers (β₁, β₂), got {betas!r}")
        _check_number(f"{where}: betas[0]", betas[0], 0.0, 1.0, high_open=True)
        _check_number(f"{where}: betas[1]", betas[1], 0.0, 1.0, high_open=True)
        eps = group["eps"]
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (0 < eps < math.inf):
            raise ValueError(f"{where}: eps: expected a positive finite number, got {eps!r}")

    def _check_group(self, gi: int, group: dict) -> None:
        if not isinstance(group.get("use_muon"), bool):
            raise ValueError(
                f"param_groups[{gi}]: expected a 'use_muon' flag (True or False) in every group, got "
                f"{group.get('use_muon')!r}; build the groups with muon_param_groups(model)"
            )
        self._check_hparams(f"param_groups[{gi}]", group)
        if group["use_muon"]:
            self._check_matrices(gi, group)

    @torch.no_grad()
    def step(self, closure=None):
        """One step: Muon on the Muon groups, AdamW on the rest; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_finite_grads(self.param_groups)
        self._muon_update([g for g in self.param_groups if g["use_muon"]])
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_update(group)
        return loss

    def _adamw_update(self, group: dict) -> None:
        """AdamW on every parameter of the group with a gradient, as multi-tensor (``torch._foreach_*``) ops.

        One launch per op for the whole group instead of one per parameter: a model has dozens of small vectors
        (norm gains, biases, AttnRes pseudo-queries), and a Python loop over them costs more than their math.
        Parameters are grouped by their step count (those that missed a step have their own bias corrections).
        """
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            by_step.setdefault(state["step"], []).append(p)
        for t, params in by_step.items():
            grads = [p.grad for p in params]
            exp_avg = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)  # m ← β₁·m + (1 − β₁)·g
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)  # v ← β₂·v + (1 − β₂)·g²
            denom = torch._foreach_div(exp_avg_sq, 1 - beta2**t)  # √(v / (1 − β₂ᵗ)) + ε
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_addcdiv_(params, exp_avg, denom, value=-lr / (1 - beta1**t))


def muon_param_groups(model: nn.Module) -> list[dict]:
    """Split a model's trainable parameters into a Muon group and an AdamW group (for ``MuonWithAdamW``).

    Muon gets the hidden weight matrices: every 2-D parameter and every 3-D stack of expert matrices
    ``[E, out, in]``. AdamW gets everything else: parameters of embeddings (any module or name segment starting
    with ``embed``), the output head ``lm_head`` (a classifier, not a hidden layer, even though it is 2-D),
    normalisation gains (modules named ``*Norm``), biases and other vectors, and ≥4-D tensors (Muon would need a
    reshape convention for those). Tied weights appear once, under their first name.

    Returns ``[{"params": [(name, p), ...], "use_muon": True}, {..., "use_muon": False}]`` without empty groups.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    owner: dict[int, nn.Module] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = owner[id(p)]
        segments = name.split(".")
        to_adamw = (
            p.dim() not in (2, 3)
            or isinstance(module, _ADAMW_MODULES)
            or type(module).__name__.endswith("Norm")
            or any(s.startswith(_EMBED_PREFIX) or s == _HEAD_NAME for s in segments)
        )
        (adamw if to_adamw else muon).append((name, p))
    groups = [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}]
    return [g for g in groups if g["params"]]

"""Muon, the spec: quintic Newton–Schulz orthogonalisation, Moonlight's update scaling, one Muon step.

Plain PyTorch in the input dtype (use fp32 or fp64 for a reference; bf16 gives the "plain-torch" anchor that
the benchmark times). Papers: Moonlight, "Muon is Scalable for LLM Training" (arXiv 2502.16982, §2, App. A)
and Kimi K2 (arXiv 2507.20534, MuonClip).

Muon's update for a weight matrix ``W ∈ R^{A×B}`` with gradient ``G_t``::

    M_t = β·M_{t−1} + (1 − β)·G_t                      momentum (EMA form, as torch.optim.Muon)
    U_t = (1 − β)·G_t + β·M_t   (Nesterov)   or  M_t
    O_t = NS₅(U_t) ≈ U Vᵀ  where U_t = U Σ Vᵀ          orthogonalised update, singular values ≈ 1
    W_t = W_{t−1} − η·λ·W_{t−1} − η·s(A, B)·O_t        decoupled weight decay with the unadjusted η

``s(A, B) = 0.2·√max(A, B)`` ("match_rms_adamw", Moonlight Eq. 4) gives every matrix the update RMS of AdamW
(about 0.2), because a full-rank orthogonal ``A×B`` matrix has RMS ``1/√max(A, B)`` (Moonlight Lemma 1).
Classical momentum ``M_t = β·M_{t−1} + G_t`` (Moonlight's toy code) is the same direction scaled by
``1/(1 − β)``, and NS starts with a Frobenius normalisation, so both give the same ``O_t``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_COEFFICIENTS",
    "ADJUST_LR_MODES",
    "newton_schulz",
    "newton_schulz_scalar",
    "ns_flops",
    "lr_adjustment",
    "muon_momentum",
    "muon_apply",
    "muon_step_reference",
]

# (a, b, c) of the quintic f(x) = a·x + b·x³ + c·x⁵ (Keller Jordan's Muon): the slope at 0 is as large as
# possible while 5 steps still keep every singular value in [0.68, 1.13] (it does not converge to 1).
DEFAULT_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
ADJUST_LR_MODES = ("match_rms_adamw", "original", None)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Quintic Newton–Schulz orthogonalisation of a (batch of) matrices, in ``G``'s dtype.

    For each matrix ``G ∈ R^{m×n}`` of ``G: [..., m, n]``::

        X₀ = G / max(‖G‖_F, eps)            ‖G‖_F ≥ ‖G‖₂, so every singular value of X₀ is ≤ 1
        (tall, m > n: work on X₀ᵀ so the Gram matrix below is min(m, n)² — n×n instead of m×m)
        repeat ``steps`` times:
            A = X Xᵀ                        [r, r], r = min(m, n), symmetric
            B = b·A + c·A·A                 [r, r], symmetric
            X ← a·X + B·X                   = (a·I + b·XXᵀ + c·(XXᵀ)²)·X

    With ``X = U Σ Vᵀ`` one step maps ``Σ ↦ f(Σ) = a·Σ + b·Σ³ + c·Σ⁵`` and keeps U, V, so the result is
    ``U f⁵(Σ) Vᵀ``: an approximation of the orthogonal polar factor ``U Vᵀ``. Dividing by ``max(‖G‖_F, eps)``
    (rather than adding eps) keeps the result independent of the scale of ``G`` whenever ``‖G‖_F ≥ eps``;
    a zero matrix maps to zero. Cost: ``steps·(4·r²·max(m, n) + 2·r³)`` FLOPs (three matmuls per step).

    Returns a tensor of ``G``'s shape and dtype.
    """
    a, b, c = coefficients
    X = G / torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True).clamp_min(eps)  # [..., m, n]
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT  # [..., n, m]: now rows ≤ cols
    for _ in range(steps):
        A = X @ X.mT  # [..., r, r]
        B = b * A + c * (A @ A)  # [..., r, r]
        X = a * X + B @ X  # [..., r, max(m, n)]
    return X.mT if tall else X


def newton_schulz_scalar(
    sigma: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS
) -> torch.Tensor:
    """What ``steps`` Newton–Schulz steps do to one (normalised) singular value: ``f^steps(σ)``, element-wise,
    with ``f(σ) = a·σ + b·σ³ + c·σ⁵``. Used to plot the polynomial and to predict NS singular values."""
    a, b, c = coefficients
    x = sigma
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


def ns_flops(m: int, n: int, steps: int = 5, symmetric: bool = False) -> float:
    """Matmul FLOPs of ``steps`` NS steps on one ``m×n`` matrix (r = min, k = max of m, n).

    Full products: ``X Xᵀ`` 2r²k, ``A·A`` 2r³, ``B·X`` 2r²k, so ``4r²k + 2r³`` per step. Computing one triangle of
    the two symmetric products halves them: ``3r²k + r³``. The ratio is ``(4e + 2)/(3e + 1)`` with ``e = k/r``:
    1.5 for a square matrix, the bound on what the symmetric kernels can gain.
    """
    r, k = min(m, n), max(m, n)
    per_step = 3 * r * r * k + r**3 if symmetric else 4 * r * r * k + 2 * r**3
    return float(steps * per_step)


def lr_adjustment(shape: tuple[int, ...] | torch.Size, adjust_lr: str | None) -> float:
    """The factor ``s(A, B)`` that multiplies the learning rate of a Muon update of a matrix ``[..., A, B]``.

    * ``"match_rms_adamw"``: ``0.2·√max(A, B)`` (Moonlight Eq. 4): the update RMS becomes ≈ 0.2, AdamW's,
      so Muon reuses AdamW's learning rate and weight decay.
    * ``"original"``: ``√max(1, A/B)`` (Keller Jordan): same as Moonlight up to one global constant when every
      matrix has the same fan-in B.
    * ``None``: 1.

    A 3-D parameter ``[E, A, B]`` is a stack of E independent matrices; (A, B) are its last two dimensions.
    """
    A, B = int(shape[-2]), int(shape[-1])
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    if adjust_lr == "original":
        return math.sqrt(max(1.0, A / B))
    if adjust_lr is None:
        return 1.0
    raise ValueError(f"adjust_lr: expected one of {list(ADJUST_LR_MODES)!r}, got {adjust_lr!r}")


def muon_momentum(grad: torch.Tensor, momentum_buffer: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """``M_t = β·M_{t−1} + (1 − β)·G_t`` in place; returns ``U_t = (1 − β)·G_t + β·M_t`` (Nesterov) or ``M_t``.

    ``grad`` is not modified (Keller Jordan's ``lerp_`` on ``p.grad`` is a known trap).
    """
    momentum_buffer.mul_(momentum).add_(grad, alpha=1 - momentum)
    return grad * (1 - momentum) + momentum * momentum_buffer if nesterov else momentum_buffer


def muon_apply(param: torch.Tensor, ortho: torch.Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """``W_t = (1 − η·λ)·W_{t−1} − η·s·O_t`` in place: decoupled weight decay with the unadjusted η."""
    param.mul_(1 - lr * weight_decay)
    param.add_(ortho, alpha=-lr * scale)


def muon_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    adjust_lr: str | None,
) -> None:
    """One Muon step on one parameter ``[A, B]`` or ``[E, A, B]``, in place (``param`` and ``momentum_buffer``).

    ``grad`` is not modified. Equations in the module docstring; each line below is one of them.
    """
    update = muon_momentum(grad, momentum_buffer, momentum, nesterov)  # U_t
    ortho = newton_schulz(update, steps=ns_steps)  # O_t ≈ U Vᵀ, per matrix
    muon_apply(param, ortho, lr, weight_decay, lr_adjustment(param.shape, adjust_lr))  # W_t

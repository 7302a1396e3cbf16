"""Checks for the chapter 01 exercises: ``python -m nanokimi.grade 01_muon [--path my_copy/]``.

Each ``check_exK_topic(module)`` runs the attempt on seeded random and edge-case inputs (CPU; Triton under the
interpreter at tiny shapes) and compares it with the chapter's reference (``nanokimi.muon``), mostly in fp64. A
failure raises AssertionError naming the case, the worst elements and the size of the error, with a hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nanokimi.grade import call_attempt as _call
from nanokimi.muon import QKClip, max_logit_per_head, reference
from nanokimi.testing import check_attempt_close, kernel_device, poisoned_like, randn
from nanokimi.triton_utils import interpreting

QUINTIC = reference.DEFAULT_COEFFICIENTS
CUBIC = (1.5, -0.5, 0.0)


# --- helpers ---------------------------------------------------------------------------------------------------


class _ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns while active (to spot m×m Gram matrices)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def _check_no_big_gram(name: str, fn: Callable, G: torch.Tensor, *args) -> None:
    """A tall ``G: [..., m, n]`` (m > n) must be iterated transposed: no ``[..., m, m]`` tensor may appear."""
    m, n = G.shape[-2:]
    recorder = _ShapeRecorder()
    with recorder:
        _call(fn, G, *args)
    big = [s for s in recorder.shapes if len(s) >= 2 and s[-2:] == (m, m)]
    if big:
        raise AssertionError(
            f"{name}: for a tall {m}×{n} matrix a tensor of shape {big[0]} appeared, an {m}×{m} Gram matrix. "
            f"hint: transpose tall matrices first (X = X.mT) so that X Xᵀ is {n}×{n}, and transpose back at the end"
        )


# --- exercise 1 ------------------------------------------------------------------------------------------------
def _ns_plus_eps(G: torch.Tensor, steps: int, coefficients, eps: float = 1e-7) -> torch.Tensor:
    """The common mistake X₀ = G / (‖G‖_F + eps), to recognise it in an attempt."""
    a, b, c = coefficients
    X = G / (torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True) + eps)
    X = X.mT if G.shape[-2] > G.shape[-1] else X
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if G.shape[-2] > G.shape[-1] else X


def check_ex1_newton_schulz(m) -> None:
    cases = [  # (case, shape, steps, coefficients)
        ("square 8×8", (8, 8), 5, QUINTIC),
        ("wide 6×20", (6, 20), 5, QUINTIC),
        ("tall 24×5", (24, 5), 5, QUINTIC),
        ("one row 1×7", (1, 7), 5, QUINTIC),
        ("one column 9×1", (9, 1), 5, QUINTIC),
        ("1 step, 7×11", (7, 11), 1, QUINTIC),
        ("3 steps with coefficients (1.5, -0.5, 0), 10×6", (10, 6), 3, CUBIC),
    ]
    for i, (case, shape, steps, coefficients) in enumerate(cases):
        G = randn(*shape, seed=100 + i, dtype=torch.float64)
        want = reference.newton_schulz(G, steps, coefficients)
        got = _call(m.newton_schulz, G, steps, coefficients)
        hint = "X₀ = G / max(‖G‖_F, eps); then `steps` times A = X Xᵀ, B = b·A + c·A·A, X = a·X + B·X"
        if case.startswith("tall") or "10×6" in case:
            hint += "; for a tall matrix transpose X₀ first and transpose the result back"
        if isinstance(got, torch.Tensor) and got.shape == G.shape:
            if torch.allclose(got, _ns_plus_eps(G, steps, coefficients), rtol=1e-12, atol=1e-14):
                hint = "divide by max(‖G‖_F, eps) (clamp_min), not by ‖G‖_F + eps: NS amplifies the small scale error"
        check_attempt_close(f"newton_schulz [{case}, fp64]", got, want, 1e-10, hint)

    for i, shape in enumerate([(2, 3, 5, 9), (3, 12, 4)]):  # every matrix of a batch on its own
        G = randn(*shape, seed=120 + i, dtype=torch.float64) * torch.linspace(0.1, 10, shape[-3])[:, None, None]
        check_attempt_close(
            f"newton_schulz [batch {list(shape)}, matrices of different norms, fp64]",
            _call(m.newton_schulz, G),
            reference.newton_schulz(G),
            1e-10,
            "normalise each matrix by its own norm: vector_norm(G, dim=(-2, -1), keepdim=True)",
        )

    G = randn(12, 16, seed=130, dtype=torch.float64)
    base = _call(m.newton_schulz, G)
    for scale in (1e3, 1e-3, 1e-5 / float(torch.linalg.vector_norm(G))):
        check_attempt_close(
            f"newton_schulz(G·{scale:.3g}) vs newton_schulz(G) [scale invariance, ‖G·s‖_F ≥ eps]",
            _call(m.newton_schulz, G * scale),
            base,
            1e-10,
            "divide by max(‖G‖_F, eps) (clamp_min), not by ‖G‖_F + eps: an added eps changes small inputs",
        )
    tiny = G * (1e-9 / float(torch.linalg.vector_norm(G)))  # ‖G‖_F = 1e-9 < eps: X₀ = G / eps
    check_attempt_close(
        "newton_schulz [‖G‖_F = 1e-9 < eps = 1e-7]",
        _call(m.newton_schulz, tiny),
        reference.newton_schulz(tiny),
        1e-10,
        "below eps the divisor is eps itself: max(‖G‖_F, eps)",
    )
    check_attempt_close(
        "newton_schulz [zero 5×7 matrix]",
        _call(m.newton_schulz, torch.zeros(5, 7, dtype=torch.float64)),
        torch.zeros(5, 7, dtype=torch.float64),
        0.0,
        "a zero matrix must map to zeros, not NaN: divide by max(‖G‖_F, eps)",
        atol=1e-300,
    )
    G32 = randn(9, 14, seed=131)
    check_attempt_close(
        "newton_schulz [fp32 input 9×14, vs the fp64 reference]",
        _call(m.newton_schulz, G32),
        reference.newton_schulz(G32.double()).float(),
        1e-5,
        "keep the input's dtype (no .double() / .float() conversions)",
    )
    _check_no_big_gram("newton_schulz", m.newton_schulz, randn(40, 6, seed=132, dtype=torch.float64))
    _check_no_big_gram("newton_schulz", m.newton_schulz, randn(2, 30, 4, seed=133, dtype=torch.float64))


# --- exercise 2 ------------------------------------------------------------------------------------------------
def _expected_steps(sigma0: float, target: float, coefficients, max_steps: int) -> int | None:
    sigma = torch.tensor(float(sigma0), dtype=torch.float64)
    for n in range(max_steps + 1):
        if float(sigma) >= target:
            return n
        sigma = reference.newton_schulz_scalar(sigma, 1, coefficients)
    return None


def check_ex2_cubic_newton_schulz(m) -> None:
    sigma = torch.linspace(0.0, 1.7, 52, dtype=torch.float64)
    for steps in (1, 4, 12):
        check_attempt_close(
            f"cubic_map(σ ∈ [0, 1.7], steps={steps}) [fp64]",
            _call(m.cubic_map, sigma, steps),
            reference.newton_schulz_scalar(sigma, steps, CUBIC),
            1e-12,
            "f(σ) = 1.5·σ − 0.5·σ³, applied `steps` times",
        )
    sigma32 = sigma.float()
    check_attempt_close(
        "cubic_map [fp32 input, steps=3]",
        _call(m.cubic_map, sigma32, 3),
        reference.newton_schulz_scalar(sigma32, 3, CUBIC),
        1e-6,
        "keep the input's dtype",
    )

    cases = [
        ("square 8×8", (8, 8), 5),
        ("wide 5×13", (5, 13), 3),
        ("tall 20×6", (20, 6), 4),
        ("batch [2, 4, 7]", (2, 4, 7), 2),
    ]
    for i, (case, shape, steps) in enumerate(cases):
        G = randn(*shape, seed=200 + i, dtype=torch.float64)
        check_attempt_close(
            f"newton_schulz_cubic [{case}, steps={steps}, fp64]",
            _call(m.newton_schulz_cubic, G, steps),
            reference.newton_schulz(G, steps, CUBIC),
            1e-10,
            "X₀ = G / max(‖G‖_F, eps) per matrix (tall ones transposed); then X ← 1.5·X − 0.5·(X Xᵀ)·X",
        )
    _check_no_big_gram("newton_schulz_cubic", m.newton_schulz_cubic, randn(36, 5, seed=210, dtype=torch.float64), 3)

    # The cubic converges: 30 steps on a well-conditioned matrix give the exact polar factor U Vᵀ.
    U, _ = torch.linalg.qr(randn(12, 12, seed=211, dtype=torch.float64))
    V, _ = torch.linalg.qr(randn(20, 12, seed=212, dtype=torch.float64))
    singular_values = torch.linspace(0.5, 1.0, 12, dtype=torch.float64)
    G = U @ torch.diag(singular_values) @ V.mT  # [12, 20], σ in [0.5, 1]
    check_attempt_close(
        "newton_schulz_cubic(G, 30) vs the polar factor U Vᵀ [12×20, σ ∈ [0.5, 1]]",
        _call(m.newton_schulz_cubic, G, 30),
        U @ V.mT,
        1e-9,
        "30 cubic steps converge: every normalised σ ≥ 0.14 reaches 1 to rounding; check the update formula",
    )

    step_cases = [  # (σ₀, target, coefficients, max_steps)
        (0.01, 0.68, CUBIC, 100),
        (0.01, 0.68, QUINTIC, 100),
        (0.001, 0.99, CUBIC, 100),
        (0.01, 0.99, QUINTIC, 4),
        (0.01, 0.99, QUINTIC, 3),
        (0.9, 0.5, CUBIC, 100),
        (0.5, 0.5, CUBIC, 100),
        (0.0, 0.5, CUBIC, 50),
    ]
    for sigma0, target, coefficients, max_steps in step_cases:
        name = "cubic" if coefficients == CUBIC else "quintic"
        want = _expected_steps(sigma0, target, coefficients, max_steps)
        got = _call(m.steps_to_reach, sigma0, target, coefficients, max_steps)
        if got != want:
            raise AssertionError(
                f"steps_to_reach(σ₀={sigma0}, target={target}, {name} {coefficients}, max_steps={max_steps}) "
                f"returned {got!r}, expected {want!r}. hint: the smallest n in [0, max_steps] (both ends included) "
                "with g^n(σ₀) ≥ target (n = 0 when σ₀ already is), None when there is none"
            )


# --- exercise 3 ------------------------------------------------------------------------------------------------
def _reference_step(param, grad, buf, **hp):
    param, buf = param.clone(), buf.clone()
    reference.muon_step_reference(param, grad, buf, **hp)
    return param, buf


def _param_hint(param0, grad, buf0, got, hp) -> str:
    """Name the likely mistake by matching the attempt against a few wrong variants of the step."""
    scale = reference.lr_adjustment(param0.shape, hp["adjust_lr"])
    beta, lr, wd = hp["momentum"], hp["lr"], hp["weight_decay"]

    def variant(nesterov=hp["nesterov"], decay_lr=lr, step_scale=scale, per_matrix=True):
        buf = buf0.clone()
        update = reference.muon_momentum(grad, buf, beta, nesterov)
        if per_matrix:
            ortho = reference.newton_schulz(update, hp["ns_steps"])
        else:  # a 3-D stack normalised as one tensor
            ortho = reference.newton_schulz(update.reshape(-1, update.shape[-1]), hp["ns_steps"]).view_as(update)
        return param0 * (1 - decay_lr * wd) - lr * step_scale * ortho

    variants = [
        (
            param0 * (1 - lr * wd),
            "only the weight decay reached param: add −η·s·O in place (param.add_), not param = …",
        ),
        (variant(nesterov=not hp["nesterov"]), f"nesterov={hp['nesterov']} was not honoured"),
        (variant(decay_lr=lr * scale), "weight decay uses the unadjusted η: W·(1 − η·λ), not W·(1 − η·s·λ)"),
        (variant(step_scale=1.0), "the update is scaled by η·s(A, B); s = lr_adjustment(param.shape, adjust_lr)"),
    ]
    if param0.dim() == 3:
        variants.append((variant(per_matrix=False), "a 3-D [E, A, B] parameter is E matrices, each on its own"))
    for candidate, hint in variants:
        if torch.allclose(got, candidate, rtol=1e-9, atol=1e-12):
            return hint
    return "W ← (1 − η·λ)·W − η·s(A, B)·NS₅(U), with U the Nesterov look-ahead (1 − β)·G + β·M or M"


def check_ex3_muon_step(m) -> None:
    for shape in [(64, 256), (256, 64), (100, 100), (3, 32, 48), (1, 1), (7, 5)]:
        for mode in reference.ADJUST_LR_MODES:
            got = _call(m.lr_adjustment, shape, mode)
            want = reference.lr_adjustment(shape, mode)
            if not isinstance(got, int | float) or not math.isclose(got, want, rel_tol=1e-12):
                raise AssertionError(
                    f"lr_adjustment({shape}, {mode!r}) returned {got!r}, expected {want!r}. hint: (A, B) are the last "
                    "two dimensions; 'match_rms_adamw': 0.2·√max(A, B), 'original': √max(1, A/B), None: 1"
                )
    try:
        _call(m.lr_adjustment, (4, 4), "adamw")
    except ValueError as err:
        if "adjust_lr" not in str(err):
            raise AssertionError(
                f"lr_adjustment((4, 4), 'adamw'): the ValueError should name adjust_lr, got: {err}"
            ) from None
    else:
        raise AssertionError("lr_adjustment((4, 4), 'adamw') returned instead of raising ValueError naming adjust_lr")

    cases = [  # (case, shape, hyper-parameters)
        ("2-D 16×24, Nesterov, match_rms_adamw", (16, 24), dict(nesterov=True, adjust_lr="match_rms_adamw")),
        ("tall 24×16, no Nesterov, original", (24, 16), dict(nesterov=False, adjust_lr="original", momentum=0.9)),
        ("3-D [3, 8, 12] experts, Nesterov, None", (3, 8, 12), dict(nesterov=True, adjust_lr=None)),
        ("wide 4×40, no weight decay, 3 NS steps", (4, 40), dict(nesterov=True, weight_decay=0.0, ns_steps=3)),
    ]
    for i, (case, shape, overrides) in enumerate(cases):
        hp = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr="match_rms_adamw")
        hp.update(overrides)
        param = randn(*shape, seed=300 + 10 * i, dtype=torch.float64)
        buf = torch.zeros_like(param)
        for step in range(3):
            grad = randn(*shape, seed=301 + 10 * i + step, dtype=torch.float64)
            grad_before = grad.clone()
            param0, buf0 = param.clone(), buf.clone()
            want_param, want_buf = _reference_step(param, grad, buf, **hp)
            _call(m.muon_step_, param, grad, buf, **hp)
            where = f"[{case}, step {step + 1}]"
            if not torch.equal(grad, grad_before):
                raise AssertionError(
                    f"muon_step_ {where} modified grad. hint: compute the look-ahead into a new tensor"
                )
            classical = buf0 * hp["momentum"] + grad
            hint = "M ← β·M + (1 − β)·G, in place in momentum_buffer"
            if torch.allclose(buf, classical, rtol=1e-12, atol=1e-15) and step == 0:
                hint = "use the EMA form M ← β·M + (1 − β)·G (not the classical M ← β·M + G)"
            if torch.equal(buf, buf0):
                hint = "update momentum_buffer in place (mul_/add_), do not rebind the name"
            check_attempt_close(f"momentum_buffer after muon_step_ {where}", buf, want_buf, 1e-12, hint)
            if torch.equal(param, param0):
                raise AssertionError(
                    f"muon_step_ {where} left param unchanged. hint: update param in place (mul_, add_)"
                )
            check_attempt_close(
                f"param after muon_step_ {where}", param, want_param, 1e-10, _param_hint(param0, grad, buf0, param, hp)
            )

    # A zero gradient: O = NS(0) = 0, so the weight only decays.
    hp = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr="match_rms_adamw")
    param = randn(10, 6, seed=390, dtype=torch.float64)
    buf = torch.zeros_like(param)
    want_param, _ = _reference_step(param, torch.zeros_like(param), buf, **hp)
    _call(m.muon_step_, param, torch.zeros_like(param), buf, **hp)
    check_attempt_close(
        "param after muon_step_ [zero gradient, zero buffer]", param, want_param, 1e-12, "NaN? NS of 0 must be 0"
    )


# --- exercise 4 ------------------------------------------------------------------------------------------------
class _ToyAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, bias: bool, seed: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, dtype=torch.float64)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, dtype=torch.float64)
        self.v_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, dtype=torch.float64)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(randn(*p.shape, seed=seed + i, dtype=torch.float64))

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D] → [B, H, T, T]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return (q @ k.mT) * self.head_dim**-0.5


def _check_max_logits(m) -> None:
    cases = [  # (case, B, H, T, S, causal, dtype)
        ("not causal, T=5 queries, S=7 keys", 2, 3, 5, 7, False, torch.float32),
        ("causal prefill T=S=6", 2, 4, 6, 6, True, torch.float32),
        ("causal decode T=1, S=7", 3, 2, 1, 7, True, torch.float32),
        ("causal T=3 last queries of S=6", 1, 3, 3, 6, True, torch.float64),
    ]
    for i, (case, B, H, T, S, causal, dtype) in enumerate(cases):
        q = randn(B, H, T, 4, seed=400 + i, dtype=dtype)
        k = randn(B, H, S, 4, seed=410 + i, dtype=dtype)
        check_attempt_close(
            f"max_logit_per_head [{case}, {dtype}]",
            _call(m.max_logit_per_head, q, k, 0.5, causal),
            max_logit_per_head(q, k, 0.5, causal),
            1e-6,
            "max over batch, queries and attended keys of scale·q·k, per head, as fp32; with causal=True query i "
            "(of the last T positions) sees keys j ≤ S − T + i",
        )
    # A future key that would win if it were not masked.
    q = randn(1, 2, 4, 4, seed=420)
    k = randn(1, 2, 4, 4, seed=421)
    k[:, :, -1] = 50 * q[:, :, 0]  # key 3 aligns with query 0, which must not see it
    check_attempt_close(
        "max_logit_per_head [causal, the largest logit is a masked future key]",
        _call(m.max_logit_per_head, q, k, 1.0, True),
        max_logit_per_head(q, k, 1.0, True),
        1e-6,
        "mask keys j > S − T + i with −inf before taking the max",
    )


def _check_qk_clip_mha(m, bias: bool) -> None:
    n_heads, head_dim, threshold = 4, 3, 100.0
    max_logits = torch.tensor([5.0, 150.0, 100.0, 300.0])  # heads 1 and 3 clipped; head 2 sits exactly at τ
    mine, ref = (_ToyAttention(8, n_heads, head_dim, bias, seed=430) for _ in range(2))
    before = {name: p.detach().clone() for name, p in mine.named_parameters()}
    holder = nn.Module()
    holder.attn = ref
    clip = QKClip(threshold)
    clip.observe("attn", max_logits)
    want_gamma = clip.apply_(holder)["attn"]
    got_gamma = _call(
        m.qk_clip_,
        mine.q_proj.weight,
        mine.k_proj.weight,
        max_logits.clone(),
        head_dim,
        threshold,
        mine.q_proj.bias,
        mine.k_proj.bias,
    )
    case = f"4 heads, S_max = {max_logits.tolist()}, τ = {threshold}, bias={bias}"
    check_attempt_close(
        f"γ returned by qk_clip_ [{case}]", got_gamma, want_gamma, 1e-6, "γ_h = τ/S_max[h] if S_max[h] > τ, else 1"
    )
    for name, p in mine.named_parameters():
        want = dict(ref.named_parameters())[name].detach()
        check_attempt_close(
            f"{name} after qk_clip_ [{case}]", p.detach(), want, 1e-6, "rows h·d:(h+1)·d of q and k times √γ_h"
        )
        for head in (0, 2):  # not clipped: bit-for-bit unchanged
            rows = slice(head * head_dim, (head + 1) * head_dim)
            if not torch.equal(p.detach()[rows], before[name][rows]):
                raise AssertionError(
                    f"{name}: rows of head {head} (S_max = {max_logits[head]:g} ≤ τ) changed. hint: write only "
                    "the rows of heads with S_max > τ"
                )
    x = randn(2, 5, 8, seed=440, dtype=torch.float64)
    ratio = mine.logits(x) / _ToyAttention(8, n_heads, head_dim, bias, seed=430).logits(x)  # [B, H, T, T]
    check_attempt_close(
        f"logits after / before qk_clip_, per head [{case}]",
        ratio,
        want_gamma.double()[None, :, None, None].expand_as(ratio),
        1e-6,
        "√γ_h on both the q and k rows (and biases) of head h: every logit of head h scales by γ_h",
    )


def _mla_logits(x, q_c, k_c, q_r, k_r, n_heads):
    """Head h's logit q^C_h·k^C_h + q^R_h·k^R for every pair of positions; [B, H, T, T] (scale 1)."""
    B, T, _ = x.shape
    qc = (x @ q_c.mT).view(B, T, n_heads, -1).transpose(1, 2)  # [B, H, T, d_c]
    kc = (x @ k_c.mT).view(B, T, n_heads, -1).transpose(1, 2)  # [B, H, T, d_c]
    qr = (x @ q_r.mT).view(B, T, n_heads, -1).transpose(1, 2)  # [B, H, T, d_r]
    kr = (x @ k_r.mT)[:, None]  # [B, 1, T, d_r], shared by every head
    return qc @ kc.mT + qr @ kr.mT


def _check_qk_clip_mla(m) -> None:
    n_heads, d_c, d_r, d_model = 4, 4, 2, 8
    weights = [randn(rows, d_model, seed=450 + i, dtype=torch.float64) for i, rows in enumerate([16, 16, 8, 2])]
    q_c, k_c, q_r, k_r = weights
    x = randn(2, 6, d_model, seed=455, dtype=torch.float64)
    before = _mla_logits(x, *weights, n_heads)  # [B, H, T, T]
    max_logits = before.amax(dim=(0, 2, 3)).float()  # [H]
    threshold = float(max_logits.sort().values[1])  # two heads above τ, one exactly at τ, one below
    want_gamma = torch.where(max_logits > threshold, threshold / max_logits, torch.ones_like(max_logits))
    mine = [w.clone() for w in weights]
    got_gamma = _call(m.qk_clip_mla_, mine[0], mine[1], mine[2], max_logits.clone(), threshold)
    case = f"MLA, 4 heads, S_max = {[round(v, 3) for v in max_logits.tolist()]}, τ = {threshold:.4g}"
    check_attempt_close(
        f"γ returned by qk_clip_mla_ [{case}]", got_gamma, want_gamma, 1e-6, "γ_h = τ/S_max[h] if above τ, else 1"
    )
    unclipped = (want_gamma == 1).nonzero().flatten().tolist()
    for name, new, old, per_head in zip(("q_c", "k_c", "q_r"), mine[:3], weights[:3], (d_c, d_c, d_r), strict=True):
        for head in unclipped:
            rows = slice(head * per_head, (head + 1) * per_head)
            if not torch.equal(new[rows], old[rows]):
                raise AssertionError(f"qk_clip_mla_ changed the {name} rows of head {head}, which is not above τ")
    after = _mla_logits(x, *mine[:3], k_r, n_heads)
    ratio = after / before
    hint = "√γ_h on head h's q^C and k^C rows; the rotary part q^R·k^R has k^R fixed, so q^R takes all of γ_h"
    scaled_rows = [float((mine[2][h * d_r] / q_r[h * d_r]).mean()) for h in range(n_heads)]
    for h in range(n_heads):
        if want_gamma[h] < 1 and math.isclose(scaled_rows[h], math.sqrt(float(want_gamma[h])), rel_tol=1e-6):
            hint = f"head {h}'s q^R rows were scaled by √γ_h; k^R is shared and unscaled, so q^R needs the full γ_h"
    check_attempt_close(
        f"logits after / before qk_clip_mla_, per head [{case}]",
        ratio,
        want_gamma.double()[None, :, None, None].expand_as(ratio),
        1e-6,
        hint,
    )


def check_ex4_qk_clip(m) -> None:
    _check_max_logits(m)
    _check_qk_clip_mha(m, bias=False)
    _check_qk_clip_mha(m, bias=True)
    _check_qk_clip_mla(m)


# --- exercise 5 ------------------------------------------------------------------------------------------------
class _LaunchRecorder:
    """Stands in for the attempt's ``_gram_kernel`` and records the grid of every launch."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.grids: list = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _gram_case(m, recorder, case, X, block, alpha=1.0, Y=None, beta=0.0, rtol=1e-6) -> None:
    batch, M, _ = X.shape
    out = poisoned_like(torch.empty(batch, M, M, device=X.device, dtype=X.dtype))  # NaN where nothing is written
    recorder.grids.clear()
    got = _call(m.gram_triton, X, alpha=alpha, Y=Y, beta=beta, out=out, block=block)
    if got is not out:
        raise AssertionError(f"gram_triton [{case}]: expected the `out` tensor it was given to be returned")
    want = alpha * (X.double() @ X.double().mT)
    if Y is not None:
        want = want + beta * Y.double()
    nan = torch.isnan(got).cpu()
    if bool(nan.any()):
        first = tuple(int(i) for i in nan.nonzero()[0])
        zeros = torch.zeros_like(
            out
        )  # run again into zeros: NaN that stays was computed, NaN that goes was never written
        if bool(torch.isnan(_call(m.gram_triton, X, alpha=alpha, Y=Y, beta=beta, out=zeros, block=block)).any()):
            raise AssertionError(
                f"gram_triton [{case}]: NaN in C (e.g. at {first}) computed from values read outside X. hint: mask "
                "every load (rows/cols < M, k < K) and offset each matrix by stride_xb, not M·K (X may be a view)"
            )
        where = "the strict lower triangle" if not bool(nan.triu().any()) else "the upper triangle or diagonal"
        raise AssertionError(
            f"gram_triton [{case}]: {int(nan.sum())} elements of C never written (out starts as NaN), e.g. at {first}, "
            f"in {where}. hint: launch every upper tile (i ≤ j); store the tile where col ≥ row and its transpose "
            "where col > row"
        )
    check_attempt_close(
        f"gram_triton [{case}]",
        got,
        want.to(X.dtype),
        rtol,
        "acc = Σ_k X[rows, k]·X[cols, k] over masked BLOCK_K slices; out = α·acc + β·Y[rows, cols]",
    )
    if not torch.equal(got, got.mT):
        bad = tuple(int(i) for i in (got != got.mT).nonzero()[0])
        raise AssertionError(
            f"gram_triton [{case}]: C is not exactly symmetric, e.g. C{bad} = {float(got[bad]):.9g} but its "
            "mirror differs. hint: write each element once: the tile where col ≥ row, the mirror where col > row"
        )
    tiles = math.ceil(M / block[0])
    want_grid = (tiles * (tiles + 1) // 2, batch)
    if len(recorder.grids) != 1:
        raise AssertionError(f"gram_triton [{case}]: expected one launch of _gram_kernel, saw {len(recorder.grids)}")
    grid = recorder.grids[0]
    if not isinstance(grid, tuple) or tuple(int(g) for g in grid[:2]) != want_grid:
        raise AssertionError(
            f"gram_triton [{case}]: launched _gram_kernel with grid {grid!r}, expected the tuple {want_grid}: "
            f"one program per tile on or above the diagonal (T = {tiles} tiles per side, T(T + 1)/2 of them) per "
            "matrix. hint: map the program id to (i, j) with _upper_tile instead of launching all T² tiles"
        )


def check_ex5_triton_gram(m) -> None:
    device = kernel_device()
    rtol = 1e-6 if interpreting() else 5e-3  # exact fp32 dots under the interpreter; TF32 on a GPU
    kernel = getattr(m, "_gram_kernel", None)
    if kernel is None:
        raise AssertionError("expected a Triton kernel named _gram_kernel (the grader counts its programs)")
    recorder = _LaunchRecorder(kernel)
    m._gram_kernel = recorder
    try:
        cases = [  # (case, batch, M, K, block)
            ("M=1, K=1", 1, 1, 1, (16, 16)),
            ("M=20, K=37: 2×2 tiles, ragged M and K", 2, 20, 37, (16, 16)),
            ("M=48, K=16: 3×3 tiles, exact multiples", 1, 48, 16, (16, 16)),
            ("M=33, K=50, BLOCK_K=32: 3×3 tiles", 3, 33, 50, (16, 32)),
            ("M=70, K=8, BLOCK=32: 3×3 tiles, K < BLOCK_K", 1, 70, 8, (32, 16)),
        ]
        for i, (case, batch, M, K, block) in enumerate(cases):
            X = randn(batch, M, K, seed=500 + i, device=device)
            _gram_case(m, recorder, f"X [{batch}, {M}, {K}], {case}, block={block}", X, block, rtol=rtol)
        X = randn(2, 40, 24, seed=510, device=device).mT  # [2, 24, 40], a transposed view
        _gram_case(m, recorder, "X a transposed view [2, 24, 40] (strides (960, 1, 24))", X, (16, 16), rtol=rtol)
        padded = torch.full((2, 20, 48), float("nan"), device=device)
        padded[:, :, :37] = randn(2, 20, 37, seed=513, device=device)
        X = padded[:, :, :37]  # [2, 20, 37], strides (960, 48, 1): reading past column 37 (or row 20) gives NaN
        _gram_case(
            m, recorder, "X a view of a NaN-padded buffer [2, 20, 37] (strides (960, 48, 1))", X, (16, 16), rtol=rtol
        )
        X = randn(2, 30, 19, seed=511, device=device)
        S = randn(2, 30, 30, seed=512, device=device)
        Y = S + S.mT  # symmetric
        _gram_case(m, recorder, "fused epilogue 0.7·X Xᵀ − 1.3·Y, X [2, 30, 19]", X, (16, 16), 0.7, Y, -1.3, rtol)

        try:
            _call(m.gram_triton, randn(5, 7, device=device))
        except ValueError as err:
            if "X" not in str(err):
                raise AssertionError(f"gram_triton(2-D X): the ValueError should name X, got: {err}") from None
        else:
            raise AssertionError("gram_triton(X of shape (5, 7)) returned instead of raising ValueError naming X")

        X = randn(2, 12, 30, seed=520, device=device, dtype=torch.float64)
        X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)  # one NS step starts from ‖X‖_F = 1
        recorder.grids.clear()
        got = _call(m.newton_schulz_step_triton, X.float(), QUINTIC)
        if len(recorder.grids) != 2:
            raise AssertionError(
                f"newton_schulz_step_triton launched _gram_kernel {len(recorder.grids)} times, expected 2: "
                "A = gram_triton(X) and B = gram_triton(A, alpha=c, Y=A, beta=b) (A is symmetric, so A·A = A·Aᵀ)"
            )
        check_attempt_close(
            "newton_schulz_step_triton [X [2, 12, 30], ‖X‖_F = 1, vs one step of the reference]",
            got,
            reference.newton_schulz(X, steps=1).float(),
            1e-5 if interpreting() else 1e-2,
            "a·X + B·X with B = b·A + c·A·A, A = X Xᵀ; check alpha/beta of the second gram_triton call",
        )
    finally:
        m._gram_kernel = kernel

"""Chapter 01 (Muon): Newton–Schulz reference vs an independent NumPy fp64 version, the symmetric Triton kernels
vs the reference (interpreted at tiny shapes here, compiled in bf16 under the ``gpu`` marker), the optimizer
(closed form, backends, torch.optim.Muon, edge cases, state_dict, distributed), the parameter split, QK-clip."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nanokimi.muon import Muon, MuonWithAdamW, QKClip, max_logit_per_head, muon_param_groups
from nanokimi.muon.kernels import (
    _TMA_ROWS,
    compute_dtype,
    gram_triton,
    newton_schulz_iterate_triton,
    newton_schulz_triton,
    poly_apply_triton,
)
from nanokimi.muon.reference import (
    DEFAULT_COEFFICIENTS,
    lr_adjustment,
    newton_schulz,
    newton_schulz_scalar,
    ns_flops,
)
from nanokimi.testing import assert_close, poisoned_like, randn

A_, B_, C_ = DEFAULT_COEFFICIENTS


def numpy_newton_schulz(G: np.ndarray, steps: int = 5) -> np.ndarray:
    """An independent fp64 NumPy Newton–Schulz on one matrix: the polynomial applied as p(XXᵀ)·X."""
    X = G / max(np.linalg.norm(G), 1e-7)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    for _ in range(steps):
        gram = X @ X.T
        X = (A_ * np.eye(gram.shape[0]) + B_ * gram + C_ * gram @ gram) @ X
    return X.T if transposed else X


def tol(device: torch.device, cpu: float, gpu: float = 2e-2) -> float:
    """Interpreter (CPU): fp32 buffers and exact fp32 dots, so rounding-level limits. GPU: bf16 operands and
    intermediates, so the bf16 limit of the issue (2e-2)."""
    return cpu if device.type == "cpu" else gpu


def grads_for(params, step: int, scale: float = 1.0):
    for i, p in enumerate(params):
        p.grad = scale * randn(*p.shape, seed=1000 * step + i, dtype=p.dtype, device=p.device)


# --- the reference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (100, 37), (1, 30), (30, 1), (3, 20, 30), (2, 2, 9, 5)])
def test_reference_matches_independent_numpy_fp64(shape):
    G = randn(*shape, seed=1, dtype=torch.float64)
    out = newton_schulz(G)
    flat = G.reshape(-1, *shape[-2:]).numpy()
    want = np.stack([numpy_newton_schulz(g) for g in flat]).reshape(shape)
    assert out.dtype == torch.float64 and out.shape == G.shape
    assert_close("NS fp64", out, torch.from_numpy(want), rtol_rel=1e-10)


def test_reference_fp32_close_to_fp64():
    G = randn(96, 160, seed=2)
    assert_close("NS fp32", newton_schulz(G), newton_schulz(G.double()), rtol_rel=1e-5)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (48, 200)])
def test_singular_values_follow_the_scalar_polynomial_and_stay_in_range(shape):
    # well-conditioned: a Gaussian matrix with aspect ratio ≥ 4 has σ_min/σ_max ≈ (√n − √m)/(√n + √m) ≥ 1/3
    G = randn(*shape, seed=3, dtype=torch.float64)
    out_sv = torch.linalg.svdvals(newton_schulz(G))
    # f⁵ is not monotone, so compare the sorted values
    predicted = newton_schulz_scalar(torch.linalg.svdvals(G) / torch.linalg.norm(G)).sort(descending=True).values
    assert_close("σ(NS(G)) vs f⁵(σ/‖G‖)", out_sv, predicted, rtol_rel=1e-9)
    assert float(out_sv.min()) >= 0.6 and float(out_sv.max()) <= 1.2, (float(out_sv.min()), float(out_sv.max()))


def test_update_rms_lemma():
    # Moonlight Lemma 1: a full-rank orthogonal A×B matrix has RMS exactly 1/√max(A, B) ...
    A, B = 256, 1024
    G = randn(A, B, seed=4, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert math.isclose(float((U @ Vh).pow(2).mean().sqrt()), 1 / math.sqrt(max(A, B)), rel_tol=1e-12)
    # ... and NS₅ lands within 10% of it (its singular values are in [0.68, 1.13], not all 1)
    rms = float(newton_schulz(G).pow(2).mean().sqrt())
    assert abs(rms * math.sqrt(max(A, B)) - 1) <= 0.10, rms * math.sqrt(max(A, B))


def test_reference_scale_invariance_and_zero_input():
    G = randn(40, 24, seed=5, dtype=torch.float64)
    base = newton_schulz(G)
    for scale in (2.0**-20, 2.0**20):  # powers of two: the normalised input is the same bits
        assert torch.equal(newton_schulz(G * scale), base)
    zero = newton_schulz(torch.zeros(8, 5))
    assert torch.equal(zero, torch.zeros(8, 5))


def test_ns_flops_and_symmetric_bound():
    assert ns_flops(4096, 4096) / ns_flops(4096, 4096, symmetric=True) == pytest.approx(1.5)
    e = 4  # (4e + 2)/(3e + 1)
    assert ns_flops(2048, 8192) / ns_flops(8192, 2048, symmetric=True) == pytest.approx((4 * e + 2) / (3 * e + 1))


def test_lr_adjustment_modes():
    assert lr_adjustment((64, 256), "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert lr_adjustment((256, 64), "original") == pytest.approx(2.0)
    assert lr_adjustment((64, 256), "original") == 1.0
    assert lr_adjustment((8, 64, 256), None) == 1.0
    with pytest.raises(ValueError, match="adjust_lr: expected one of"):
        lr_adjustment((4, 4), "spectral")


# --- the Triton kernels (interpreted on CPU: fp32 buffers; compiled on GPU: bf16) ---------------------------
@pytest.mark.parametrize("block", [None, (16, 16, 16), (16, 32, 16), (32, 16, 32)])
@pytest.mark.parametrize("batch,m,k", [(1, 37, 100), (2, 5, 33), (1, 1, 20), (3, 48, 64), (2, 100, 24)])
def test_gram_kernel_upper_tiles_mirrored(device, block, batch, m, k):
    X = randn(batch, m, k, seed=6, device=device, dtype=compute_dtype())
    out = poisoned_like(torch.empty(batch, m, m, device=device, dtype=X.dtype))
    gram_triton(X, out=out, block=block)
    ref = X.double() @ X.double().mT
    assert_close("X Xᵀ", out, ref, rtol_rel=tol(device, 1e-6, 4e-3))  # GPU: one bf16 rounding of the output
    assert torch.equal(out, out.mT), "each element is written once from one accumulator: exactly symmetric"


@pytest.mark.parametrize("block", [None, (16, 32, 16)])
def test_gram_kernel_fused_epilogue(device, block):
    A = randn(2, 45, 45, seed=7, device=device)
    A = (A + A.mT).to(compute_dtype())  # symmetric, as kernel (2) requires
    out = poisoned_like(A)
    gram_triton(A, alpha=C_, Y=A, beta=B_, out=out, block=block)
    Ad = A.double()
    assert_close("b·A + c·A·A", out, B_ * Ad + C_ * Ad @ Ad, rtol_rel=tol(device, 1e-6, 4e-3))


@pytest.mark.parametrize("block", [None, (16, 16, 32)])
@pytest.mark.parametrize("batch,m,n", [(1, 37, 100), (2, 17, 5), (1, 1, 9)])
def test_poly_kernel(device, block, batch, m, n):
    B = randn(batch, m, m, seed=8, device=device, dtype=compute_dtype())
    X = randn(batch, m, n, seed=9, device=device, dtype=compute_dtype())
    out = poisoned_like(X)
    poly_apply_triton(B, X, a=A_, out=out, block=block)
    want = A_ * X.double() + B.double() @ X.double()
    assert_close("a·X + B·X", out, want, rtol_rel=tol(device, 1e-6, 4e-3))


def test_kernels_take_transposed_views(device):
    # the tall case iterates on X.mT without a copy: strides (…, 1, m) must work for reads and writes
    X = randn(1, 50, 20, seed=10, device=device, dtype=compute_dtype())
    gram = gram_triton(X.mT, block=(16, 16, 16))
    assert_close("XᵀX", gram, X.double().mT @ X.double(), rtol_rel=tol(device, 1e-6, 4e-3))
    B = randn(1, 20, 20, seed=11, device=device, dtype=compute_dtype())
    out = poisoned_like(X)
    poly_apply_triton(B, X.mT, a=0.5, out=out.mT, block=(16, 16, 16))
    want = 0.5 * X.double().mT + B.double() @ X.double().mT
    assert_close("(a·Xᵀ + B·Xᵀ)ᵀ", out.mT, want, rtol_rel=tol(device, 1e-6, 4e-3))


@pytest.mark.parametrize("shape", [(100, 37), (37, 100), (64, 80), (1, 64), (64, 1), (3, 20, 30)])
def test_newton_schulz_triton_matches_reference(device, shape):
    G = randn(*shape, seed=12, device=device)
    out = newton_schulz_triton(G)
    assert out.shape == G.shape and out.dtype == G.dtype
    # interpreter: fp32 buffers, exact fp32 dots → rounding only (the fp32 reference is 1.5e-6 from fp64)
    assert_close("NS triton", out, newton_schulz(G.double()), rtol_rel=tol(device, 1e-5), atol=tol(device, 1e-5))


def test_newton_schulz_triton_steps_and_zero(device):
    G = randn(30, 40, seed=13, device=device)
    for steps in (1, 2, 3):
        want = newton_schulz(G.double(), steps)
        assert_close(f"NS{steps}", newton_schulz_triton(G, steps=steps), want, rtol_rel=tol(device, 1e-5))
    assert torch.equal(newton_schulz_triton(torch.zeros(9, 7, device=device)), torch.zeros(9, 7, device=device))
    assert newton_schulz_triton(torch.zeros(0, 5, device=device)).shape == (0, 5)


def test_iterate_overwrites_its_input_buffer_only(device):
    X = randn(2, 20, 30, seed=14, device=device)
    X = (X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)).to(compute_dtype())
    want = newton_schulz(X.double(), steps=2)
    assert_close("iterate", newton_schulz_iterate_triton(X.clone(), steps=2), want, rtol_rel=tol(device, 1e-5))


def test_kernel_bad_inputs(device):
    X = randn(2, 8, 16, seed=15, device=device)
    with pytest.raises(ValueError, match="X: expected 3 dimensions"):
        gram_triton(X[0])
    with pytest.raises(TypeError, match="X: expected dtype in"):
        gram_triton(X.to(torch.int32))
    with pytest.raises(ValueError, match=r"Y: expected shape \(2, 8, 8\)"):
        gram_triton(X, Y=torch.zeros(2, 8, 9, device=device))
    with pytest.raises(ValueError, match="BLOCK_N a power of two"):
        gram_triton(X, block=(16, 24, 16))
    with pytest.raises(ValueError, match=r"B: expected shape \(2, 8, 8\)"):
        poly_apply_triton(torch.zeros(2, 8, 16, device=device), X, a=1.0)
    with pytest.raises(ValueError, match="out: expected a buffer distinct from X"):
        poly_apply_triton(torch.zeros(2, 8, 8, device=device), X, a=1.0, out=X)
    with pytest.raises(ValueError, match="G: expected at least 2 dimensions"):
        newton_schulz_triton(torch.zeros(5, device=device))
    with pytest.raises(ValueError, match="steps: expected a positive int, got 0"):
        newton_schulz_triton(X, steps=0)
    with pytest.raises(ValueError, match="coefficients: expected three numbers"):
        newton_schulz_triton(X, coefficients=(1.5, -0.5))
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        newton_schulz_triton(X, eps=0.0)


# --- the tensor-descriptor (TMA) kernels: persistent, one program per upper-triangle tile in turn ---------------
@pytest.mark.parametrize("batch,tiles,k", [(1, 3, 40), (2, 2, 56), (3, 1, 8)])
def test_gram_tma_path(device, batch, tiles, k):
    # k = 40, 56: the last K slice is cut by the descriptor's edge (zero-filled); 3 programs share 6 tiles on CPU
    m = tiles * _TMA_ROWS
    X = randn(batch, m, k, seed=16, device=device, dtype=compute_dtype())
    out = poisoned_like(torch.empty(batch, m, m, device=device, dtype=X.dtype))
    gram_triton(X, out=out, tma=True)
    assert_close("X Xᵀ (TMA)", out, X.double() @ X.double().mT, rtol_rel=tol(device, 1e-6, 4e-3))
    assert torch.equal(out, out.mT), "diagonal tiles symmetrised, off-diagonal tiles mirrored: exactly symmetric"
    fused = poisoned_like(out)
    gram_triton(out, alpha=C_, Y=out, beta=B_, out=fused, tma=True)
    Ad = out.double()
    assert_close("b·A + c·A·A (TMA)", fused, B_ * Ad + C_ * Ad @ Ad, rtol_rel=tol(device, 1e-6, 4e-3))
    assert torch.equal(fused, fused.mT)


@pytest.mark.parametrize("batch,tiles,n", [(1, 2, 40), (2, 1, 104)])
def test_poly_tma_path(device, batch, tiles, n):
    m = tiles * _TMA_ROWS
    B = randn(batch, m, m, seed=17, device=device, dtype=compute_dtype())
    X = randn(batch, m, n, seed=18, device=device, dtype=compute_dtype())
    out = poisoned_like(X)
    poly_apply_triton(B, X, a=A_, out=out, tma=True)
    want = A_ * X.double() + B.double() @ X.double()
    assert_close("a·X + B·X (TMA)", out, want, rtol_rel=tol(device, 1e-6, 4e-3))


def test_newton_schulz_tma_and_pointer_paths(device):
    G = randn(2, 2 * _TMA_ROWS, 72, seed=19, device=device)
    want = newton_schulz(G.double())
    for tma in (True, False):
        out = newton_schulz_triton(G, tma=tma)
        assert_close(f"NS tma={tma}", out, want, rtol_rel=tol(device, 1e-5), atol=tol(device, 1e-5))


def test_tma_path_bad_inputs(device):
    rows = _TMA_ROWS
    with pytest.raises(ValueError, match=f"tma: expected rows divisible by {rows}"):
        gram_triton(randn(1, rows + 1, 16, seed=20, device=device, dtype=compute_dtype()), tma=True)
    with pytest.raises(ValueError, match="tma: expected rows divisible"):  # tall: iterated as a transposed view
        newton_schulz_triton(randn(3 * rows, rows, seed=21, device=device), tma=True)
    with pytest.raises(ValueError, match="block: applies to the pointer path only"):
        gram_triton(randn(1, rows, 16, seed=22, device=device, dtype=compute_dtype()), block=(16, 16, 16), tma=True)


def test_tma_schedule_rule():
    from nanokimi.muon.kernels import _tma_fills_waves

    # 132 SMs, 128² tiles: the Gram list of r = 2048 has 136 tiles (~1 wave: pointer kernels), r = 4096 has 528
    # (4 waves: TMA); batches add up (two 2048² matrices: 272 tiles); the 8 × 4096² Muon.step group: TMA.
    assert not _tma_fills_waves(1, 2048, 132, tile=128)
    assert _tma_fills_waves(2, 2048, 132, tile=128)
    assert _tma_fills_waves(1, 4096, 132, tile=128)
    assert _tma_fills_waves(8, 4096, 132, tile=128)
    assert _tma_fills_waves(1, 8192, 132, tile=128)
    assert not _tma_fills_waves(3, 512, 132, tile=128)  # 30 tiles
    assert _tma_fills_waves(1, 2944, 132, tile=128) and not _tma_fills_waves(1, 2816, 132, tile=128)  # 276, 253


# --- the optimizer --------------------------------------------------------------------------------------------
SHAPES = [(24, 40), (40, 24), (3, 16, 24)]


def run_muon(backend: str, steps: int = 2, device="cpu", shapes=SHAPES, grad_scale=1.0, **kw):
    params = [nn.Parameter(randn(*s, seed=20 + i, device=device)) for i, s in enumerate(shapes)]
    opt = Muon(params, lr=0.02, backend=backend, **kw)
    for step in range(steps):
        grads_for(params, step, grad_scale)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_one_step_matches_closed_form(device, backend, shape):
    lr, wd, beta = 0.5, 0.1, 0.95  # a large step, so the update is not lost in the fp32 rounding of the weights
    device = device if backend == "triton" else torch.device("cpu")
    p0 = randn(*shape, seed=30, device=device)
    g = randn(*shape, seed=31, device=device)
    param = nn.Parameter(p0.clone())
    param.grad = g.clone()
    Muon([param], lr=lr, weight_decay=wd, momentum=beta, backend=backend).step()
    buf = (1 - beta) * g.double().cpu()  # M₁ from M₀ = 0
    lookahead = (1 - beta) * g.double().cpu() + beta * buf
    ortho = torch.from_numpy(numpy_newton_schulz(lookahead.numpy()))
    decayed = p0.double().cpu() * (1 - lr * wd)
    want = -lr * 0.2 * math.sqrt(max(shape)) * ortho
    assert_close(f"{backend} {shape} update", param.detach().cpu() - decayed, want, rtol_rel=tol(device, 1e-5))
    assert torch.equal(param.grad, g), "the gradient must not be modified"


def test_muon_backends_agree(device):
    ref, _ = run_muon("reference", steps=2, device=device)
    tri, _ = run_muon("triton", steps=2, device=device)
    start = [randn(*s, seed=20 + i, device=device) for i, s in enumerate(SHAPES)]
    for r, t, s in zip(ref, tri, start, strict=True):
        assert_close("triton vs reference update", t.detach() - s, r.detach() - s, rtol_rel=tol(device, 1e-5))


def test_muon_3d_param_is_a_stack_of_independent_matrices():
    stacked, _ = run_muon("reference", steps=2, shapes=[(3, 16, 24)])
    for e in range(3):
        single = nn.Parameter(randn(3, 16, 24, seed=20)[e].clone())
        opt = Muon([single], lr=0.02, backend="reference")
        for step in range(2):
            single.grad = randn(3, 16, 24, seed=1000 * step)[e].clone()
            opt.step()
        assert_close(f"expert {e}", stacked[0][e], single, rtol_rel=1e-6)


def test_muon_matches_torch_optim_muon():
    ours, _ = run_muon("reference", steps=3, shapes=[(24, 40), (40, 24)], nesterov=True)
    params = [nn.Parameter(randn(*s, seed=20 + i)) for i, s in enumerate([(24, 40), (40, 24)])]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Muon(params, lr=0.02, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        grads_for(params, step)
        opt.step()
    for o, t, s in zip(ours, params, start, strict=True):
        # torch.optim.Muon runs NS in bf16: the updates agree to bf16 rounding
        assert_close("update vs torch.optim.Muon", o.detach() - s, t.detach() - s, rtol_rel=2e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_muon_zero_gradient_and_scale_invariance(device, backend):
    device = device if backend == "triton" else torch.device("cpu")
    param = nn.Parameter(randn(24, 40, seed=40, device=device))
    before = param.detach().clone()
    param.grad = torch.zeros_like(param)
    Muon([param], lr=0.02, weight_decay=0.1, backend=backend).step()
    assert torch.isfinite(param).all()
    assert_close("zero grad: weight decay only", param, before * (1 - 0.02 * 0.1), rtol_rel=1e-7)
    # powers of two: the normalised update is the same bits, so "tiny" gradients (‖U‖_F ≈ 3e-5) are not
    # distorted by eps (dividing by ‖U‖ + eps instead would change this update by ~3e-3 relative)
    base, _ = run_muon(backend, steps=2, device=device, shapes=[(24, 40)])
    for scale in (2.0**-20, 2.0**20):
        scaled, _ = run_muon(backend, steps=2, device=device, shapes=[(24, 40)], grad_scale=scale)
        for b, s in zip(base, scaled, strict=True):
            assert_close(f"grad × {scale:g}", s, b, rtol_rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_muon_non_finite_gradient_raises_before_changing_anything(bad):
    params = [nn.Parameter(randn(8, 12, seed=41)), nn.Parameter(randn(8, 12, seed=42))]
    opt = Muon([("w0", params[0]), ("w1", params[1])], lr=0.02, backend="reference")
    grads_for(params, 0)
    opt.step()
    snapshot = [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]
    grads_for(params, 1)
    params[1].grad[3, 4] = bad
    with pytest.raises(ValueError, match=r"grad of 'w1' \(shape \(8, 12\)\): expected finite values"):
        opt.step()
    after = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.equal(a, b) for a, b in zip(after, snapshot, strict=True))


def test_muon_rejects_bad_params_and_hyperparameters():
    ref = dict(backend="reference")  # CPU tensors: valid for the reference backend on any machine
    with pytest.raises(ValueError, match=r"'bias': Muon expects a 2-D matrix .* got shape \(5,\)"):
        Muon([("w", nn.Parameter(torch.zeros(5, 5))), ("bias", nn.Parameter(torch.zeros(5)))], **ref)
    with pytest.raises(ValueError, match=r"'conv': Muon expects .* got shape \(2, 3, 4, 4\)"):
        Muon([("conv", nn.Parameter(torch.zeros(2, 3, 4, 4)))], **ref)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]: Muon expects"):
        Muon([nn.Parameter(torch.zeros(5))], **ref)
    w = [nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match="adjust_lr: expected one of"):
        Muon(w, adjust_lr="spectral", **ref)
    with pytest.raises(ValueError, match="backend: expected one of"):
        Muon(w, backend="cuda")
    with pytest.raises(ValueError, match="lr: expected a finite number >= 0"):
        Muon(w, lr=-1.0, **ref)
    with pytest.raises(ValueError, match="momentum: expected a finite number >= 0.0 and < 1.0"):
        Muon(w, momentum=1.0, **ref)
    with pytest.raises(TypeError, match="ns_steps: expected a positive int"):
        Muon(w, ns_steps=2.5, **ref)
    with pytest.raises(TypeError, match="got an nn.Module"):
        Muon(nn.Linear(4, 4))


def test_muon_state_dict_round_trip():
    params, opt = run_muon("reference", steps=2)
    saved = copy.deepcopy(opt.state_dict())
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    restored = Muon(clones, lr=0.02, backend="reference")
    restored.load_state_dict(saved)
    for group in (params, clones):
        grads_for(group, 2)
    opt.step()
    restored.step()
    for p, c in zip(params, clones, strict=True):
        assert torch.equal(p, c)


# --- distributed: 2 gloo processes on the CPU must reproduce one process -----------------------------------
DIST_SHAPES = [(24, 40), (40, 24), (3, 16, 24), (16, 16), (20, 12)]


def _dist_worker(rank: int, world: int, init_file: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, _ = run_muon("reference", steps=2, shapes=DIST_SHAPES)
        torch.save([p.detach() for p in params], f"{out_prefix}{rank}.pt")
        dist.barrier()  # both ranks done before either tears gloo down (seen once in CI: SIGABRT at teardown)
    finally:
        dist.destroy_process_group()


def test_distributed_muon_matches_single_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use one thread each: same BLAS blocking, same bits
    try:
        single, _ = run_muon("reference", steps=2, shapes=DIST_SHAPES)
    finally:
        torch.set_num_threads(threads)
    prefix = str(tmp_path / "params_rank")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), prefix), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{prefix}{rank}.pt")
        for s, g in zip(single, got, strict=True):
            assert_close(f"rank {rank}", g, s, rtol_rel=1e-6, atol=1e-6)


# --- the parameter split and the hybrid optimizer ------------------------------------------------------------
class ToyLM(nn.Module):
    def __init__(self, vocab=20, d=16, experts=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d, bias=False))
        self.experts = nn.Parameter(0.1 * torch.randn(experts, d, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        h = h + self.mlp(h) + torch.einsum("btd,eod->bto", h, self.experts)
        return self.lm_head(h)


def test_muon_param_groups_split():
    model = ToyLM()
    model.frozen = nn.Linear(4, 4)
    model.frozen.requires_grad_(False)
    groups = muon_param_groups(model)
    names = {g["use_muon"]: [n for n, _ in g["params"]] for g in groups}
    assert sorted(names[True]) == ["experts", "mlp.0.weight", "mlp.2.weight"]
    assert sorted(names[False]) == ["embed.weight", "lm_head.weight", "mlp.0.bias", "norm.bias", "norm.weight"]
    tied = ToyLM()
    tied.lm_head.weight = tied.embed.weight  # tied: appears once, as the embedding
    tied_names = [n for g in muon_param_groups(tied) for n, _ in g["params"]]
    assert "lm_head.weight" not in tied_names and "embed.weight" in tied_names
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        muon_param_groups([nn.Parameter(torch.zeros(2, 2))])


def test_muon_with_adamw_steps_both_halves():
    torch.manual_seed(0)
    model = ToyLM()
    twin = copy.deepcopy(model)
    opt = MuonWithAdamW(muon_param_groups(model), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), backend="reference")
    groups = muon_param_groups(twin)
    muon_twin = Muon(groups[0]["params"], lr=1e-2, weight_decay=0.1, backend="reference")
    adamw_twin = torch.optim.AdamW([p for _, p in groups[1]["params"]], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    tokens = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opts in ((model, [opt]), (twin, [muon_twin, adamw_twin])):
            for o in opts:
                o.zero_grad()
            m(tokens).square().mean().backward()
            for o in opts:
                o.step()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert_close(name, p, q, rtol_rel=1e-5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: expected a 'use_muon' flag"):
        MuonWithAdamW([{"params": list(model.parameters())}], backend="reference")
    with pytest.raises(ValueError, match=r"param_groups\[1\]: expected Muon parameters, got a group with use_muon"):
        Muon(muon_param_groups(ToyLM()), backend="reference")
    with pytest.raises(ValueError, match=r"betas\[1\]: expected a finite number"):
        MuonWithAdamW(muon_param_groups(ToyLM()), betas=(0.9, 1.0), backend="reference")


# --- QK-clip ---------------------------------------------------------------------------------------------------
class ToyAttention(nn.Module):
    def __init__(self, d_model=24, n_heads=3, head_dim=8, bias=False, dtype=torch.float64):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, dtype=dtype)

    def logits(self, x):  # [B, H, T, T], scaled
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return q, k, (q @ k.mT) / math.sqrt(self.head_dim)


def test_max_logit_per_head_matches_a_loop():
    q = randn(2, 3, 5, 4, seed=50)
    k = randn(2, 3, 7, 4, seed=51)
    got = max_logit_per_head(q, k, scale=0.5, causal=True)
    want = torch.full((3,), -math.inf)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                for j in range(7):
                    if j <= 7 - 5 + i:
                        want[h] = max(want[h], 0.5 * float(q[b, h, i] @ k[b, h, j]))
    assert_close("causal max logit", got, want, rtol_rel=1e-6)
    full = max_logit_per_head(q, k, scale=0.5)
    assert_close("full max logit", full, 0.5 * torch.einsum("bhtd,bhsd->bhts", q, k).amax(dim=(0, 2, 3)), 1e-6)
    with pytest.raises(ValueError, match="k: expected shape"):
        max_logit_per_head(q, randn(2, 4, 7, 4), scale=0.5)
    with pytest.raises(ValueError, match="scale: expected a positive finite number"):
        max_logit_per_head(q, k, scale=0.0)


@pytest.mark.parametrize("bias", [False, True])
def test_qk_clip_caps_clipped_heads_and_leaves_the_rest_bit_identical(bias):
    torch.manual_seed(0)
    model = nn.Module()
    model.attn = ToyAttention(bias=bias)
    with torch.no_grad():
        model.attn.q_proj.weight[8:16] *= 12.0  # head 1 grows large logits
        model.attn.k_proj.weight[16:24] *= 9.0  # head 2 too
    x = randn(2, 10, 24, seed=52, dtype=torch.float64)
    q, k, logits_before = model.attn.logits(x)
    s_max = max_logit_per_head(q, k, scale=1 / math.sqrt(8))
    tau = 0.5 * float(s_max.sort().values[1])  # between: clips the two largest heads, keeps the smallest
    clipped = s_max > tau
    assert clipped.sum() == 2, s_max
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip = QKClip(threshold=tau)
    clip.observe("attn", s_max - 1.0)  # a smaller micro-batch first: the running max must win
    clip.observe("attn", s_max)
    gammas = clip.apply_(model)["attn"]
    assert clip.observed == {}
    q2, k2, logits_after = model.attn.logits(x)
    s_after = max_logit_per_head(q2, k2, scale=1 / math.sqrt(8))
    assert (s_after[clipped] <= tau * (1 + 1e-5)).all() and torch.allclose(s_after[clipped], torch.tensor(tau))
    for h in range(3):
        want = logits_before[:, h] * float(gammas[h])
        assert_close(f"head {h} logits scale by γ", logits_after[:, h], want, rtol_rel=1e-12)
    assert torch.equal(gammas[~clipped], torch.ones(1))
    after = dict(model.named_parameters())
    assert torch.equal(after["attn.v_proj.weight"], untouched["attn.v_proj.weight"])
    keep = slice(0, 8)  # head 0: not clipped
    for proj in ("q_proj", "k_proj"):
        assert torch.equal(after[f"attn.{proj}.weight"][keep], untouched[f"attn.{proj}.weight"][keep])
        if bias:
            assert torch.equal(after[f"attn.{proj}.bias"][keep], untouched[f"attn.{proj}.bias"][keep])


def test_qk_clip_bad_inputs():
    with pytest.raises(ValueError, match="threshold: expected a positive finite number"):
        QKClip(threshold=0.0)
    clip = QKClip(threshold=1.0)
    with pytest.raises(ValueError, match="max_logits_per_head: expected finite values"):
        clip.observe("attn", torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="max_logits_per_head: expected 1 dimensions"):
        clip.observe("attn", torch.ones(2, 3))
    clip.observe("attn", torch.ones(3))
    with pytest.raises(ValueError, match="expected 3 heads for layer 'attn'"):
        clip.observe("attn", torch.ones(4))
    model = nn.Module()
    model.attn = ToyAttention(n_heads=2, head_dim=12)
    with pytest.raises(ValueError, match="expected 2 values for layer 'attn'"):
        clip.apply_(model)
    clip.reset()
    clip.observe("missing", torch.ones(2))
    with pytest.raises(ValueError, match="'missing' is not a submodule"):
        clip.apply_(model)
    clip.reset()
    model.plain = nn.Linear(3, 3)
    clip.observe("plain", torch.ones(2))
    with pytest.raises(ValueError, match="expected attributes q_proj, k_proj, n_heads, head_dim"):
        clip.apply_(model)


# --- GPU: compiled kernels in bf16, odd, batched and large shapes ----------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [
        (100, 37),
        (37, 100),
        (64, 256),
        (256, 64),
        (1, 4096),
        (4096, 1),
        (1000, 1000),
        (4, 256, 1024),
        (3, 257, 129),
        (2048, 8192),
    ],
)
def test_gpu_newton_schulz_bf16_matches_reference(shape):
    G = randn(*shape, seed=60, device="cuda")
    out = newton_schulz_triton(G)
    assert out.dtype == torch.float32 and out.shape == G.shape
    # bf16 operands and stored intermediates (as a plain bf16 torch NS) against fp32 math
    assert_close("NS bf16 vs fp32 reference", out, newton_schulz(G), rtol_rel=2e-2, atol=2e-2)
    bf = newton_schulz_triton(G.bfloat16())
    assert bf.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [None, False])
@pytest.mark.parametrize("m,k", [(4096, 4096), (129, 1000), (1, 64)])
def test_gpu_gram_bf16_symmetric(m, k, tma):
    X = randn(2, m, k, seed=61, device="cuda", dtype=torch.bfloat16)
    out = poisoned_like(torch.empty(2, m, m, device="cuda", dtype=torch.bfloat16))
    gram_triton(X, out=out, tma=tma)  # None: the TMA kernel at 4096, the pointer kernel at 129 and 1 rows
    assert torch.equal(out, out.mT)
    # fp32 accumulation, one bf16 rounding of the output: ≤ 2⁻⁸ relative per element
    assert_close("X Xᵀ bf16", out, X.double() @ X.double().mT, rtol_rel=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_large_batch_offsets_use_int64(tma):
    # 2100 matrices of 1024² bf16: batch·stride > 2³¹, the last matrix must still be right
    G = randn(1024, 1024, seed=62, device="cuda", dtype=torch.bfloat16).expand(2100, 1024, 1024).clone()
    G[-1] = randn(1024, 1024, seed=63, device="cuda", dtype=torch.bfloat16)
    out = newton_schulz_triton(G, tma=tma)
    assert_close("last matrix", out[-1], newton_schulz(G[-1].float()), rtol_rel=2e-2, atol=2e-2)
    assert_close("first matrix", out[0], newton_schulz(G[0].float()), rtol_rel=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 512, 768)])
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_newton_schulz_tma_and_pointer_paths(shape, tma):
    G = randn(*shape, seed=64, device="cuda", dtype=torch.bfloat16)
    out = newton_schulz_triton(G, tma=tma)
    assert_close(f"NS bf16 tma={tma}", out, newton_schulz(G.float()), rtol_rel=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_muon_triton_backend_matches_reference_and_torch():
    shapes = [(512, 384), (384, 512), (4, 256, 128), (300, 77)]
    ref, _ = run_muon("reference", steps=3, device="cuda", shapes=shapes)
    tri, _ = run_muon("triton", steps=3, device="cuda", shapes=shapes)
    start = [randn(*s, seed=20 + i, device="cuda") for i, s in enumerate(shapes)]
    for r, t, s in zip(ref, tri, start, strict=True):
        assert_close("update triton vs reference", t.detach() - s, r.detach() - s, rtol_rel=2e-2)
    params = [nn.Parameter(s.clone()) for s in start[:2]]
    opt = torch.optim.Muon(params, lr=0.02, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        grads_for(params, step)
        opt.step()
    for t, p, s in zip(tri[:2], params, start[:2], strict=True):
        assert_close("update triton vs torch.optim.Muon", t.detach() - s, p.detach() - s, rtol_rel=2e-2)


def test_triton_ns_accepts_fp64_input(device):
    """fp64 gradients are normalised in fp64, iterated in the compute dtype, and returned as fp64."""
    from nanokimi.muon.kernels import newton_schulz_triton
    from nanokimi.muon.reference import newton_schulz

    G = randn(2, 12, 20, seed=3, dtype=torch.float64, device=device)
    out = newton_schulz_triton(G)
    assert out.dtype == torch.float64
    ref = newton_schulz(G.cpu())
    tol = 2e-2 if device.type == "cuda" else 1e-5  # bf16 compute on the GPU, fp32 under the interpreter
    assert_close("ns(fp64)", out.cpu(), ref, rtol_rel=tol)

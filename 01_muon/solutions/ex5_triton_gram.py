"""Exercise 5 (hard, Triton): the symmetric Gram kernel ``C = α·X Xᵀ + β·Y``, upper tiles only, mirrored.

Task. Two of Newton–Schulz's three matmuls per step are symmetric: ``A = X Xᵀ`` and ``A·A`` (= ``A·Aᵀ``, because
A is symmetric). Split ``C ∈ R^{M×M}`` into ``BLOCK×BLOCK`` tiles, ``T = ⌈M / BLOCK⌉`` per side. Tile (i, j) and
tile (j, i) are transposes of each other, so launch one program per tile on or above the diagonal (i ≤ j),
``T(T + 1)/2`` programs instead of T², and let each write its tile twice::

    acc[r, c] = Σ_k X[r, k]·X[c, k]           r in tile row i, c in tile column j; fp32, over BLOCK_K slices of k
    out       = α·acc + β·Y[r, c]              (β·Y only when a Y is given; Y symmetric)
    C[r, c] = out[r, c]    for c ≥ r           the tile itself (on a diagonal tile only its upper half)
    C[c, r] = out[r, c]    for c > r           the mirrored tile

Every element of C is then written exactly once, from one accumulator, so C is bit-for-bit symmetric. The
FLOPs of ``X Xᵀ`` drop from ``2M²K`` to about ``M²K``; that is where the chapter's kernel gets its speed.

Program → tile. Number the upper tiles row by row: row i holds tiles (i, i), (i, i + 1), …, (i, T − 1), and
starts at program ``start(i) = i·T − i(i − 1)/2``. Program p belongs to the last row i with ``start(i) ≤ p``,
and its column is ``j = i + (p − start(i))``. Write that walk as the jitted helper ``_upper_tile`` (a loop over
the T rows with ``tl.where``; a closed form with a square root risks rounding).

Write
1. ``_upper_tile(pid, n_tiles)`` → ``(i, j)`` (``@triton.jit``).
2. ``_gram_kernel``: program ``(p, b)`` computes upper tile p of matrix b of the batch. ``X: [batch, M, K]`` and
   ``Y, C: [batch, M, M]`` come with all their strides (a transposed view must work without a copy).
3. ``gram_triton(X, alpha=1.0, Y=None, beta=0.0, out=None, block=(16, 16))`` → ``C: [batch, M, M]`` in X's dtype;
   ``block = (BLOCK, BLOCK_K)``. Validate X with ``nanokimi.checks.check_tensor`` (3-D, a float dtype: a
   ValueError naming ``X``), allocate ``out`` when none is given, and launch ``_gram_kernel[grid](...)`` with the
   tuple ``grid = (T(T + 1)/2, batch)``: the grader wraps ``_gram_kernel`` and counts the programs.
4. ``newton_schulz_step_triton(X, coefficients)``: one NS step ``a·X + (b·A + c·A·A)·X`` for ``X: [batch, r, k]``
   (r ≤ k) with exactly two ``gram_triton`` calls, ``A = X Xᵀ`` and ``B = c·A·Aᵀ + b·A``; the last product
   ``B·X`` may stay in torch (the chapter has a kernel for it, ``_poly_kernel``).

Hints.
- Tiles: ``rows = i·BLOCK + tl.arange(0, BLOCK)``, ``cols = j·BLOCK + tl.arange(0, BLOCK)``. The right operand
  of ``tl.dot`` is ``X[cols, k]ᵀ``: load it as a ``[BLOCK_K, BLOCK]`` block with ``k`` on the first axis.
- Mask every load and store (rows < M, cols < M, k < K): M and K need not be multiples of the blocks, and the
  interpreter does not catch out-of-bounds accesses. Masked loads take ``other=0.0``.
- The mirrored store: pointers ``c + cols[:, None]·stride_cm + rows[None, :]·stride_cn`` and values
  ``tl.trans(out)``, masked with ``cols[:, None] > rows[None, :]`` (the diagonal is already written).
- ``HAS_Y: tl.constexpr`` lets the compiler drop the Y load when there is none; pass ``out`` as the unused
  pointer. Use ``tl.program_id(1).to(tl.int64)`` for the batch offset.
- Under the interpreter (no GPU) this runs on CPU tensors in NumPy, exactly in fp32; keep shapes tiny. On a GPU
  ``tl.dot`` rounds fp32 operands to TF32 and ``tl.dot`` needs BLOCK, BLOCK_K ≥ 16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from nanokimi.checks import check_tensor
from nanokimi.triton_utils import ensure_cuda_or_interpreter


@triton.jit
def _upper_tile(pid, n_tiles):
    """Row-major numbering of the tiles (i, j), i ≤ j, of an ``n_tiles × n_tiles`` grid: program ``pid ↦ (i, j)``."""
    i = 0
    row_start = 0  # start(i): the first program of row i
    for r in range(0, n_tiles):
        start = r * n_tiles - (r * (r - 1)) // 2  # rows 0..r−1 hold n_tiles, n_tiles − 1, … tiles
        mine = pid >= start
        i = tl.where(mine, r, i)
        row_start = tl.where(mine, start, row_start)
    return i, i + (pid - row_start)


@triton.jit
def _gram_kernel(
    x_ptr,
    y_ptr,
    c_ptr,
    M,
    K,
    stride_xb,
    stride_xm,
    stride_xk,
    stride_yb,
    stride_ym,
    stride_yn,
    stride_cb,
    stride_cm,
    stride_cn,
    alpha,
    beta,
    HAS_Y: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[b] = alpha·X[b] X[b]ᵀ (+ beta·Y[b]) for one upper tile (program 0) of one matrix b (program 1)."""
    i, j = _upper_tile(tl.program_id(0), tl.cdiv(M, BLOCK))
    batch = tl.program_id(1).to(tl.int64)
    rows = i * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    cols = j * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    x_base = x_ptr + batch * stride_xb
    row_ok = rows < M
    col_ok = cols < M
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        lhs_ptrs = x_base + rows[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk  # [BLOCK, BLOCK_K] = X[rows, k]
        rhs_ptrs = x_base + cols[None, :] * stride_xm + (k0 + ks)[:, None] * stride_xk  # [BLOCK_K, BLOCK] = X[cols, k]ᵀ
        lhs = tl.load(lhs_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        rhs = tl.load(rhs_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(lhs, rhs, acc)

    in_bounds = row_ok[:, None] & col_ok[None, :]
    out = alpha * acc
    if HAS_Y:
        y_ptrs = y_ptr + batch * stride_yb + rows[:, None] * stride_ym + cols[None, :] * stride_yn
        out += beta * tl.load(y_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    out = out.to(c_ptr.dtype.element_ty)
    c_base = c_ptr + batch * stride_cb
    upper = cols[None, :] >= rows[:, None]  # on a diagonal tile only its upper half (the rest is the mirror's)
    tl.store(c_base + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=in_bounds & upper)
    mirror_ptrs = c_base + cols[:, None] * stride_cm + rows[None, :] * stride_cn  # [BLOCK, BLOCK]: C[cols, rows]
    mirror_ok = (cols[:, None] > rows[None, :]) & col_ok[:, None] & row_ok[None, :]
    tl.store(mirror_ptrs, tl.trans(out), mask=mirror_ok)


def gram_triton(
    X: torch.Tensor,
    *,
    alpha: float = 1.0,
    Y: torch.Tensor | None = None,
    beta: float = 0.0,
    out: torch.Tensor | None = None,
    block: Sequence[int] = (16, 16),
) -> torch.Tensor:
    """``C = alpha·X Xᵀ + beta·Y`` for ``X: [batch, M, K]`` (any strides), ``Y: [batch, M, M]`` symmetric or None."""
    check_tensor("X", X, ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    batch, M, K = X.shape
    if Y is not None:
        check_tensor("Y", Y, shape=(batch, M, M), dtypes=(X.dtype,))
    if out is None:
        out = torch.empty((batch, M, M), device=X.device, dtype=X.dtype)
    check_tensor("out", out, shape=(batch, M, M), dtypes=(X.dtype,))
    ensure_cuda_or_interpreter(X, out, names=("X", "out"))
    if out.numel() == 0:
        return out
    block_size, block_k = block
    n_tiles = triton.cdiv(M, block_size)
    grid = (n_tiles * (n_tiles + 1) // 2, batch)  # the upper triangle of tiles, diagonal included
    y = out if Y is None else Y  # never read when HAS_Y is False
    _gram_kernel[grid](
        X, y, out, M, K, *X.stride(), *y.stride(), *out.stride(), float(alpha), float(beta),
        HAS_Y=Y is not None, BLOCK=block_size, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def newton_schulz_step_triton(X: torch.Tensor, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """One NS step ``a·X + (b·A + c·A·A)·X``, ``A = X Xᵀ``, for ``X: [batch, r, k]`` (r ≤ k); X's dtype."""
    a, b, c = coefficients
    A = gram_triton(X)  # [batch, r, r]
    B = gram_triton(A, alpha=c, Y=A, beta=b)  # c·A·Aᵀ + b·A = b·A + c·A² since A is symmetric
    return a * X + B @ X  # [batch, r, k]

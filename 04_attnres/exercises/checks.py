"""Checks for the chapter 04 exercises: ``python -m nanokimi.grade 04_attnres [--path my_copy/]``.

Each ``check_exK_topic(module)`` runs the attempt on seeded random and edge-case inputs (CPU; Triton under the
interpreter at tiny shapes) and compares it with the chapter's float64 reference (``nanokimi.attnres.reference``).
A failure raises AssertionError naming the case, the worst elements and the size of the error, with a hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import ModuleType

import numpy as np
import torch

import nanokimi.attnres as attnres_package
from nanokimi.attnres import reference
from nanokimi.grade import call_attempt as _call
from nanokimi.testing import assert_close, kernel_device, poisoned_like, rand, randn

F64 = torch.float64


# --- helpers ---------------------------------------------------------------------------------------------------


def _close(name: str, got: object, want: torch.Tensor, rtol: float, hint: str = "") -> None:
    """``assert_close`` after checking that the attempt returned a tensor of the reference's shape; ``hint`` is
    appended to a failure."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{name}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    try:
        assert_close(name, got, want, rtol_rel=rtol)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n  hint: {hint}" if hint else str(exc)) from None


def _pair(name: str, got: object) -> tuple:
    if not (isinstance(got, tuple | list) and len(got) == 2):
        raise AssertionError(f"{name}: expected a tuple of two tensors, got {type(got).__name__}")
    return tuple(got)


def _matches(got: torch.Tensor, variant: torch.Tensor) -> bool:
    """Whether a wrong answer equals a known wrong variant (to name the mistake)."""
    if tuple(got.shape) != tuple(variant.shape):
        return False
    g, v = got.detach().to("cpu", F64), variant.detach().to("cpu", F64)
    return bool(torch.isfinite(g).all()) and bool(torch.allclose(g, v, rtol=1e-6, atol=1e-9))


def _guess(got: torch.Tensor, variants: dict[str, torch.Tensor]) -> str:
    for mistake, variant in variants.items():
        if _matches(got, variant):
            return f"\n  likely mistake: {mistake}"
    return ""


@contextmanager
def _replaced(m: ModuleType, originals: dict[str, Callable], make: Callable[[str, Callable], Callable]) -> Iterator:
    """While active, every binding of the chapter's functions ``originals`` (in ``reference``, in the package and in
    the attempt's globals, whatever it imported them as) is replaced by ``make(name, original)``."""
    saved = []
    for name, original in originals.items():
        stand_in = make(name, original)
        for namespace in (reference, attnres_package, m):
            for attr, value in list(vars(namespace).items()):
                if value is original:
                    saved.append((namespace, attr, value))
                    setattr(namespace, attr, stand_in)
    try:
        yield
    finally:
        for namespace, attr, value in reversed(saved):
            setattr(namespace, attr, value)


def _forbidden(name: str, original: Callable) -> Callable:
    def refuse(*args, **kwargs):
        raise AssertionError(f"your code called the chapter's reference.{name}, which is the answer: write it yourself")

    return refuse


@contextmanager
def _poisoned_empty(case: str) -> Iterator[None]:
    """While active, ``torch.empty``/``empty_like`` return NaN-filled tensors, so an output element the kernel never
    wrote fails the comparison instead of passing by luck. Each one is the front of a buffer twice its size: a store
    past its end (a missing row mask) lands in the NaN tail, where it is caught, instead of corrupting memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    guarded: list[tuple[torch.Tensor, int, tuple[int, ...]]] = []

    def poisoned(maker):
        def make(*args, **kwargs):
            want = maker(*args, **kwargs)
            buffer = poisoned_like(real_empty(2 * want.numel() + 4096, dtype=want.dtype, device=want.device))
            guarded.append((buffer, want.numel(), tuple(want.shape)))
            return buffer[: want.numel()].view(want.shape)

        return make

    torch.empty, torch.empty_like = poisoned(real_empty), poisoned(real_empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
    for buffer, numel, shape in guarded:
        tail = buffer[numel:]
        written = ~torch.isnan(tail) if tail.dtype.is_floating_point else tail != poisoned_like(tail)
        if bool(written.any()):
            raise AssertionError(
                f"[{case}] the kernel wrote {int(written.sum())} elements past the end of an output of shape {shape}. "
                "hint: mask every store (rows < M, and columns < D); the last tile of rows is partial"
            )


def _quiet() -> AbstractContextManager:
    """The interpreter runs kernels in NumPy: σ(−1e4) overflows e^{1e4} to inf on the way to a correct 0."""
    return np.errstate(over="ignore", under="ignore")


class _LaunchRecorder:
    """Stands in for the attempt's kernel and records the grid of every launch (a grid lambda is evaluated on the
    launch's keyword arguments, as Triton does)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            self.grids.append(tuple(int(x) for x in (g if isinstance(g, tuple | list) else (g,))))
            return self.kernel[grid](*args, **kwargs)

        return launch


@contextmanager
def _recording(m: ModuleType, kernel_name: str) -> Iterator[_LaunchRecorder]:
    kernel = getattr(m, kernel_name, None)
    if kernel is None:
        raise AssertionError(f"expected a Triton kernel named {kernel_name} in your file (the grader records its grid)")
    recorder = _LaunchRecorder(kernel)
    setattr(m, kernel_name, recorder)
    try:
        yield recorder
    finally:
        setattr(m, kernel_name, kernel)


def _check_grid(name: str, recorder: _LaunchRecorder, want: tuple[int, ...], what: str) -> None:
    if len(recorder.grids) != 1:
        raise AssertionError(f"{name}: expected one launch of the kernel, saw {len(recorder.grids)}")
    got = recorder.grids[0]
    if got + (1,) * (len(want) - len(got)) != want + (1,) * (len(got) - len(want)):
        raise AssertionError(f"{name}: launched the kernel with grid {got}, expected {want} ({what})")


def _sublayers(n_layers: int, d: int, seed: int, dtype: torch.dtype, record: list):
    """Sublayers v = tanh(h W_l) that append (l, h) to ``record`` when called."""
    weights = [(randn(d, d, seed=seed + l, dtype=F64) / math.sqrt(d)).to(dtype) for l in range(n_layers)]

    def make(l: int, w: torch.Tensor):
        def sublayer(h: torch.Tensor) -> torch.Tensor:
            record.append((l, h.detach().clone()))
            return torch.tanh(h @ w)

        return sublayer

    return [make(l, w) for l, w in enumerate(weights)]


def _stream_case(n_layers: int, block_size: int, d: int, lead: tuple[int, ...], seed: int, dtype=F64, norms=True,
                 zero_queries=False, as_list=False) -> dict:  # fmt: skip
    """Inputs of a Block AttnRes forward (everything but the sublayers)."""
    queries = 0.5 * randn(n_layers, d, seed=seed + 100, dtype=F64)
    final_query = 0.5 * randn(d, seed=seed + 101, dtype=F64)
    if zero_queries:
        queries, final_query = torch.zeros_like(queries), torch.zeros_like(final_query)
    args = {
        "embedding": randn(*lead, d, seed=seed, dtype=F64).to(dtype),
        "queries": list(queries.to(dtype).unbind(0)) if as_list else queries.to(dtype),
        "block_size": block_size,
        "final_query": final_query.to(dtype),
        "norm_weights": (1 + 0.2 * randn(n_layers, d, seed=seed + 102, dtype=F64)).to(dtype) if norms else None,
        "final_norm_weight": (1 + 0.2 * randn(d, seed=seed + 103, dtype=F64)).to(dtype) if norms else None,
    }
    return args


def _where(l: int, block_size: int) -> str:
    n, i = l // block_size + 1, l % block_size
    blocks = ", ".join(f"b_{j}" for j in range(n))
    partial = f" + [partial of block {n} (Σ of its {i} outputs so far)]" if i else " (first of its block: no partial)"
    return f"sublayer {l} is in block {n} at position {i}: its sources are [{blocks}]{partial}"


def _run_stream(m_fn: Callable, n_layers: int, case: str, args: dict, seed: int, rtol: float, want_fn: Callable,
                around: Callable[[], AbstractContextManager] = nullcontext) -> None:  # fmt: skip
    """Run the reference, then the attempt (inside ``around()``), on the same inputs; compare each sublayer's
    input, then the output."""
    dtype, d = args["embedding"].dtype, args["embedding"].shape[-1]
    want_record: list = []
    want = want_fn(sublayers=_sublayers(n_layers, d, seed, dtype, want_record), **args)
    got_record: list = []
    with around():
        got = _call(m_fn, sublayers=_sublayers(n_layers, d, seed, dtype, got_record), **args)
    order = [l for l, _ in got_record]
    if order != list(range(n_layers)):
        raise AssertionError(f"[{case}] the sublayers were called in the order {order}, expected 0 … {n_layers - 1}")
    for (l, h_got), (_, h_want) in zip(got_record, want_record, strict=True):
        _close(f"[{case}] input of sublayer {l}", h_got, h_want, rtol, _where(l, args["block_size"]))
    if not isinstance(got, torch.Tensor) or got.dtype != dtype:
        desc = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
        raise AssertionError(f"[{case}] expected the output in the embedding's dtype {dtype}, got {desc}")
    n_blocks = -(-n_layers // args["block_size"])
    hint = f"the final query attends over all {n_blocks + 1} block sums b_0 … b_{n_blocks}, the last (maybe short) included"
    _close(f"[{case}] output", got, want, rtol, hint)


# --- exercise 1 ------------------------------------------------------------------------------------------------
def _rms_variants(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> dict[str, torch.Tensor]:
    g = 1.0 if weight is None else weight
    ms = x.pow(2).mean(-1, keepdim=True)
    return {
        "sum of squares instead of their mean (divide by D)": x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * g,
        "eps outside the square root, x / (sqrt(mean(x²)) + eps)": x / (ms.sqrt() + eps) * g,
        "no square root, x / (mean(x²) + eps)": x / (ms + eps) * g,
        "computed in float32 (keep float64 inputs in float64)": reference.rms_norm(
            x.float(), None if weight is None else weight.float(), eps
        ),
        "the norm weight is not applied": x * torch.rsqrt(ms + eps),
    }


def _depth_variants(sources, query, norm_weight, eps) -> dict[str, torch.Tensor]:
    g = None if norm_weight is None else norm_weight.to(F64)
    v, q = sources.to(F64), query.to(F64)
    keys = reference.rms_norm(v, g, eps)
    logits = torch.einsum("n...d,d->n...", keys, q)
    alpha = torch.softmax(logits, 0)
    raw = torch.softmax(torch.einsum("n...d,d->n...", v, q), 0)
    return {
        "the keys are not RMS-normalised (score RMSNorm(s_i), not s_i)": torch.einsum("n...,n...d->...d", raw, v),
        "the values are normalised too (mix the raw sources)": torch.einsum("n...,n...d->...d", alpha, keys),
        "the norm weight is ignored": reference.depth_attention(v, q, None, eps)[0],
        "softmax over the tokens (dim −1) instead of over depth (dim 0)": torch.einsum(
            "n...,n...d->...d", torch.softmax(logits, -1), v
        ),
        "computed in float32 (keep float64 inputs in float64)": reference.depth_attention(
            sources.float(), query.float(), None if norm_weight is None else norm_weight.float(), eps
        )[0],
    }


def check_ex1_depth_attention(m) -> None:
    x = randn(3, 5, 16, seed=0, dtype=F64) * (4 * rand(3, 5, 1, seed=1, dtype=F64) + 0.1)
    x[0, 0] = 0.0  # a zero row: eps keeps it finite
    g = 1 + 0.3 * randn(16, seed=2, dtype=F64)
    for case, dtype, weight, eps in [
        ("x [3, 5, 16] (one zero row)", F64, None, 1e-6),
        ("with a norm weight", F64, g, 1e-6),
        ("eps = 0.5 (where eps goes matters)", F64, g, 0.5),
        ("fp32 x, no weight", torch.float32, None, 1e-6),
    ]:
        xin = x.to(dtype)
        got = _call(m.rms_norm, xin.clone(), None if weight is None else weight.to(dtype), eps)
        want = reference.rms_norm(xin.to(F64), weight, eps)
        hint = _guess(got, _rms_variants(xin.to(F64), weight, eps)).strip() if isinstance(got, torch.Tensor) else ""
        _close(f"rms_norm [{case}]", got, want, 1e-6 if dtype == torch.float32 else 1e-13, hint)

    d = 16
    scaled = randn(4, 6, d, seed=10, dtype=F64)
    scaled[2] *= 1e6
    cases = [  # (case, sources, query, norm_weight)
        ("N=5 sources, tokens [7], D=16", randn(5, 7, d, seed=3, dtype=F64), 0.5 * randn(d, seed=4, dtype=F64), None),
        ("N=3, tokens [2, 5], D=24, with a norm weight", randn(3, 2, 5, 24, seed=5, dtype=F64),
         0.5 * randn(24, seed=6, dtype=F64), 1 + 0.3 * randn(24, seed=7, dtype=F64)),
        ("no token dims: sources [4, D]", randn(4, d, seed=8, dtype=F64), randn(d, seed=9, dtype=F64), None),
        ("source 2 scaled by 1e6 (keys are normalised, values are not)", scaled, 0.5 * randn(d, seed=11, dtype=F64),
         None),
        ("query × 1e3: logits of size ~1e4 (exp overflows without the max)", randn(6, 5, d, seed=12, dtype=F64),
         1e3 * randn(d, seed=13, dtype=F64), None),
        ("fp32 sources [4, 9, 32] with a norm weight", randn(4, 9, 32, seed=14), 0.5 * randn(32, seed=15),
         1 + 0.3 * randn(32, seed=16)),
    ]  # fmt: skip
    for case, sources, query, norm_weight in cases:
        rtol = 1e-6 if sources.dtype == torch.float32 else 1e-12
        weight64 = None if norm_weight is None else norm_weight.to(F64)
        want_out, want_w = reference.depth_attention(sources.to(F64), query.to(F64), weight64, 1e-6)
        got = _call(m.depth_attention, sources.clone(), query.clone(), norm_weight, 1e-6)
        got_out, got_w = _pair(f"depth_attention [{case}]", got)
        mistake = ""
        if isinstance(got_out, torch.Tensor):
            mistake = _guess(got_out, _depth_variants(sources, query, norm_weight, 1e-6))
        name = f"depth_attention [{case}]"
        _close(f"{name} weights α [N, ...]", got_w, want_w, rtol, "α = softmax over dim 0 of the logits" + mistake)
        _close(f"{name} out [..., D]", got_out, want_out, rtol, "out = Σ_i α_i s_i over dim 0" + mistake)

    src = randn(1, 3, 5, d, seed=17, dtype=F64)
    out, w = _pair("depth_attention [one source]", _call(m.depth_attention, src.clone(), randn(d, seed=18, dtype=F64)))
    _close("depth_attention [one source] weights (must be 1)", w, torch.ones(1, 3, 5, dtype=F64), 1e-15)
    _close("depth_attention [one source] out (must be the source itself)", out, src[0], 1e-15)
    src = randn(6, 4, d, seed=19, dtype=F64)
    out, w = _pair("depth_attention [zero query]", _call(m.depth_attention, src.clone(), torch.zeros(d, dtype=F64)))
    uniform = torch.full((6, 4), 1 / 6, dtype=F64)
    _close("depth_attention [zero query] weights (must be uniform, 1/6)", w, uniform, 1e-14)
    _close("depth_attention [zero query] out (must be the mean of the sources)", out, src.mean(0), 1e-14)


# --- exercise 2 ------------------------------------------------------------------------------------------------
STREAM_SHAPES = [(1, 1), (5, 1), (7, 3), (6, 2), (4, 4), (3, 10), (12, 5)]


def check_ex2_block_attnres(m) -> None:
    for n_layers, block_size in STREAM_SHAPES:
        args = _stream_case(n_layers, block_size, 4, (1,), seed=0, norms=False)
        _, weights = reference.attnres_forward(
            sublayers=_sublayers(n_layers, 4, 0, F64, []), return_weights=True, **args
        )
        want = [int(w.shape[0]) for w in weights]
        got = _call(m.n_sources, n_layers, block_size)
        if not isinstance(got, list | tuple) or len(got) != len(want):
            raise AssertionError(
                f"n_sources({n_layers}, {block_size}): expected a list of {len(want)} ints, got {got!r}"
            )
        wrong = [l for l in range(len(want)) if int(got[l]) != want[l]]
        if wrong:
            l = wrong[0]
            where = "the final query attends over every block sum" if l == n_layers else _where(l, block_size)
            raise AssertionError(
                f"n_sources({n_layers}, {block_size}): got {list(got)}, expected {want}; entry {l}: {where}"
            )

    cases = [  # (case, L, S, D, token dims, seed, options)
        ("L=1, S=1", 1, 1, 8, (3,), 0, {}),
        ("L=5, S=1 (Full AttnRes: every output its own block)", 5, 1, 16, (2, 3), 1, {}),
        ("L=7, S=3 (the last block has one sublayer)", 7, 3, 16, (2, 3), 2, {}),
        ("L=6, S=2, queries as a list, no norm weights", 6, 2, 12, (5,), 3, {"as_list": True, "norms": False}),
        ("L=4, S=4 (one block)", 4, 4, 8, (2, 2), 4, {}),
        ("L=3, S=10 (block larger than the stack)", 3, 10, 8, (4,), 5, {}),
        ("zero queries: every input a plain average, L=5, S=2", 5, 2, 8, (3,), 6, {"zero_queries": True}),
        ("fp32 embedding, L=6, S=4", 6, 4, 16, (2, 3), 7, {"dtype": torch.float32}),
        ("bf16 embedding (mix in float32, sublayers see bf16), L=5, S=2", 5, 2, 16, (3,), 8, {"dtype": torch.bfloat16}),
    ]
    for case, n_layers, block_size, d, lead, seed, options in cases:
        args = _stream_case(n_layers, block_size, d, lead, seed, **options)
        rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}.get(options.get("dtype"), 1e-12)
        _run_stream(m.block_attnres_forward, n_layers, case, args, seed, rtol, reference.attnres_forward)


# --- exercise 3 ------------------------------------------------------------------------------------------------
def _check_merge_partials(m, around: Callable[[], AbstractContextManager]) -> None:
    d = 16
    sources = randn(7, 3, 5, d, seed=30, dtype=F64) * (1 + 3 * rand(7, 1, 1, 1, seed=31, dtype=F64))
    queries = 0.5 * randn(3, d, seed=32, dtype=F64)
    norms = 1 + 0.3 * randn(3, d, seed=33, dtype=F64)
    splits = [  # (case, set A, set B, queries)
        ("A = sources 0-2, B = sources 3-6", [0, 1, 2], [3, 4, 5, 6], queries),
        ("A = even sources, B = odd sources", [0, 2, 4, 6], [1, 3, 5], queries),
        ("A = one source, B = the other six", [4], [0, 1, 2, 3, 5, 6], queries),
        ("queries × 300: lse of several thousand (e^lse overflows float64)", [0, 1, 2], [3, 4, 5, 6], 300 * queries),
    ]
    overflow_hint = "never form e^{lse}: the weight of B is e^{lse_b − lse} = σ(lse_b − lse_a); lse = torch.logaddexp"
    for case, a, b, q in splits:
        out_a, lse_a = reference.batched_depth_attention(sources[a], q, norms)  # [S, 3, 5, D], [S, 3, 5]
        out_b, lse_b = reference.batched_depth_attention(sources[b], q, norms)
        want_out, want_lse = reference.batched_depth_attention(sources, q, norms)
        with around():
            got = _pair(f"merge_partials [{case}]", _call(m.merge_partials, out_a, lse_a, out_b, lse_b))
        name = f"merge_partials [{case}]"
        hint = "lse over A ∪ B = log(e^{lse_a} + e^{lse_b}); " + overflow_hint
        _close(f"{name} lse vs batched_depth_attention over all 7 sources", got[1], want_lse, 1e-12, hint)
        hint = "o = e^{lse_a − lse} o_a + e^{lse_b − lse} o_b (write e^{z_i − lse} = e^{z_i − lse_a} e^{lse_a − lse})"
        _close(f"{name} out vs batched_depth_attention over all 7 sources", got[0], want_out, 1e-12, hint)

    out_a, out_b = randn(4, d, seed=34, dtype=F64), randn(4, d, seed=35, dtype=F64)
    inf = float("inf")
    hand = [  # (case, lse_a, lse_b, out_a, want_out, want_lse)
        ("lse_a = 1e4, lse_b = −1e4 (A takes all the weight)", torch.full((4,), 1e4, dtype=F64),
         torch.full((4,), -1e4, dtype=F64), out_a, out_a, torch.full((4,), 1e4, dtype=F64)),
        ("lse_a = lse_b = 800 (equal weights; e^800 is inf)", torch.full((4,), 800.0, dtype=F64),
         torch.full((4,), 800.0, dtype=F64), out_a, (out_a + out_b) / 2, torch.full((4,), 800 + math.log(2), dtype=F64)),
        ("A empty: lse_a = −inf, out_a = 0", torch.full((4,), -inf, dtype=F64), torch.linspace(-3, 3, 4, dtype=F64),
         torch.zeros_like(out_a), out_b, torch.linspace(-3, 3, 4, dtype=F64)),
    ]  # fmt: skip
    for case, lse_a, lse_b, oa, want_out, want_lse in hand:
        with around():
            got = _pair(f"merge_partials [{case}]", _call(m.merge_partials, oa.clone(), lse_a, out_b.clone(), lse_b))
        _close(f"merge_partials [{case}] lse", got[1], want_lse, 1e-12, overflow_hint)
        _close(f"merge_partials [{case}] out", got[0], want_out, 1e-12, overflow_hint)


def _check_online_merge(m, around: Callable[[], AbstractContextManager]) -> None:
    d = 24
    sources = randn(4, 2, 6, d, seed=40, dtype=F64)
    x = 3 * randn(2, 6, d, seed=41, dtype=F64)
    q, g = 0.5 * randn(d, seed=42, dtype=F64), 1 + 0.3 * randn(d, seed=43, dtype=F64)
    hint = "z = queryᵀ RMSNorm(x) with the norm weight; merge (out1, lse1) with the one-source set (x, z)"
    for case, weight in [("with a norm weight", g), ("without a norm weight", None)]:
        out1, lse1 = reference.batched_depth_attention(sources, q[None], None if weight is None else weight[None])
        with around():
            got = _call(m.online_merge, out1[0], lse1[0], x.clone(), q, weight)
        want, _ = reference.depth_attention(torch.cat([sources, x[None]]), q, weight)
        _close(f"online_merge [4 phase-1 sources + x, {case}] vs depth_attention over all 5", got, want, 1e-12, hint)

    out1, x1 = randn(8, d, seed=44, dtype=F64), randn(8, d, seed=45, dtype=F64)
    z_big = reference.rms_norm(x1, g) @ (300 * q)  # logits of ~±1e3: e^z overflows float64
    lse_big = z_big + torch.tensor([0.5, -0.5, 40.0, -40.0, 1e4, -1e4, 0.0, 3.0], dtype=F64)
    cases = [  # (case, out1, lse1, partial, query scale, rtol)
        ("query × 300: z ~ ±1e3, lse1 = z + (±0.5, ±40, ±1e4, 0, 3) (e^z overflows)", out1, lse_big, x1, 300, 1e-12),
        ("one token, no token dims (lse1 is 0-d)", out1[0], torch.tensor(0.3, dtype=F64), x1[0], 1, 1e-12),
        ("fp32 inputs, tokens [3, 5]", randn(3, 5, d, seed=46), randn(3, 5, seed=47), randn(3, 5, d, seed=48), 1, 1e-6),
    ]
    for case, o, lse, partial, scale, rtol in cases:
        qq, gg = (scale * q).to(partial.dtype), g.to(partial.dtype)
        with around():
            got = _call(m.online_merge, o.clone(), lse.clone(), partial.clone(), qq, gg)
        want = reference.online_merge(o.to(F64), lse.to(F64), partial.to(F64), scale * q, g)
        _close(f"online_merge [{case}]", got, want, rtol, hint)


def check_ex3_online_merge(m) -> None:
    forbidden = {"online_merge": reference.online_merge, "two_phase_block": reference.two_phase_block,
                 "attnres_forward": reference.attnres_forward}  # fmt: skip
    _check_merge_partials(m, lambda: _replaced(m, forbidden, _forbidden))
    _check_online_merge(m, lambda: _replaced(m, forbidden, _forbidden))

    calls: list[str] = []

    def counted(name: str, original: Callable) -> Callable:
        def count(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return count

    phase1 = {
        "batched_depth_attention": reference.batched_depth_attention,
        "depth_attention": reference.depth_attention,
    }
    cases = [  # (case, L, S, D, token dims, seed, options)
        ("L=1, S=1", 1, 1, 8, (3,), 0, {}),
        ("L=5, S=1 (Full AttnRes: no merges)", 5, 1, 16, (2, 3), 1, {}),
        ("L=7, S=3 (the last block has one sublayer)", 7, 3, 16, (2, 3), 2, {}),
        ("L=8, S=4, queries as a list, no norm weights", 8, 4, 12, (5,), 3, {"as_list": True, "norms": False}),
        ("L=3, S=10 (one block, shorter than S)", 3, 10, 8, (4,), 5, {}),
        ("fp32 embedding, L=6, S=4", 6, 4, 16, (2, 3), 7, {"dtype": torch.float32}),
    ]

    @contextmanager
    def watched() -> Iterator[None]:
        calls.clear()
        with _replaced(m, forbidden, _forbidden), _replaced(m, phase1, counted):
            yield

    for case, n_layers, block_size, d, lead, seed, options in cases:
        args = _stream_case(n_layers, block_size, d, lead, seed, **options)
        rtol = 1e-5 if options.get("dtype") == torch.float32 else 1e-12
        _run_stream(m.two_phase_block, n_layers, case, args, seed, rtol, reference.two_phase_block, watched)
        n_blocks = -(-n_layers // block_size)
        made = len([c for c in calls if c in phase1])
        if made > n_blocks + 1:
            raise AssertionError(
                f"two_phase_block [{case}]: {made} depth-attention calls ({calls.count('depth_attention')} "
                f"depth_attention, {calls.count('batched_depth_attention')} batched); Algorithm 1 makes one phase-1 "
                f"call per block (⌈L / S⌉ = {n_blocks}) and one for the final query, {n_blocks + 1} in all. hint: "
                "run the block's queries together, then merge each sublayer's partial sum with online_merge"
            )


# --- exercise 4 ------------------------------------------------------------------------------------------------
def _merge_step_case(m, case: str, out1, lse1, partial, update, query, norm_weight, block_m: int, rtol: float) -> None:
    dtype, rows = partial.dtype, partial.numel() // partial.shape[-1]
    with _recording(m, "_merge_kernel") as recorder, _poisoned_empty(f"merge_step {case}"), _quiet():
        got = _pair(f"merge_step [{case}]", _call(m.merge_step, out1, lse1, partial, update, query, norm_weight,
                                                  block_m=block_m))  # fmt: skip
    h, x = got
    for name, t, want_dtype in (("h", h, out1.dtype), ("x", x, dtype)):
        if not isinstance(t, torch.Tensor) or t.dtype != want_dtype:
            desc = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise AssertionError(f"merge_step [{case}]: expected {name} as a {want_dtype} tensor, got {desc}")
    want_x = partial if update is None else (partial.float() + update.float()).to(dtype)  # the stored sum
    x_hint = "x = partial + update, added in float32 and stored in partial's dtype (x = partial without an update)"
    # bf16: one rounding of the float32 sum (the interpreter truncates where a GPU rounds to nearest: < 2⁻⁷ each)
    _close(f"merge_step [{case}] x", x, want_x.to(F64), 1e-7 if dtype == torch.float32 else 1e-2, x_hint)
    want_h = reference.online_merge(
        out1.to(F64), lse1.to(F64), want_x.to(F64), query.to(F64), None if norm_weight is None else norm_weight.to(F64)
    )
    h_hint = (
        "z = (u·x) / sqrt(mean(x²) + ε) over the D real columns (masked columns load as 0), u = query ⊙ "
        "norm_weight, h = out1 + σ(z − lse1)(x − out1). Non-finite values: e^{z} or e^{lse1} overflowed, or an "
        "element was never written (outputs start as NaN)"
    )
    _close(f"merge_step [{case}] h", h, want_h, rtol, h_hint)
    _check_grid(f"merge_step [{case}]", recorder, (math.ceil(rows / block_m),), f"⌈M / BLOCK_M⌉ with M = {rows} rows")


def check_ex4_triton_merge_step(m) -> None:
    dev = kernel_device()

    def t(*shape, seed, scale=1.0, dtype=torch.float32):
        return (scale * randn(*shape, seed=seed, dtype=F64)).to(device=dev, dtype=dtype)

    cases = [  # (case, shape [..., D], dtype, with update, with norm weight, block_m)
        ("one row, D = 1", (1, 1), torch.float32, False, False, 4),
        ("[37, 48] (a partial last tile), with update and norm weight", (37, 48), torch.float32, True, True, 4),
        ("[2, 5, 100]: token dims, D not a power of two, no update", (2, 5, 100), torch.float32, False, True, 8),
        ("bfloat16 [9, 40], with update", (9, 40), torch.bfloat16, True, True, 4),
    ]
    for i, (case, shape, dtype, with_update, with_norm, block_m) in enumerate(cases):
        d, seed = shape[-1], 50 + 10 * i
        out1, partial = t(*shape, seed=seed, dtype=dtype), t(*shape, seed=seed + 1, scale=2.0, dtype=dtype)
        update = t(*shape, seed=seed + 2, dtype=dtype) if with_update else None
        lse1 = t(*shape[:-1], seed=seed + 3)
        query = t(d, seed=seed + 4, scale=0.5)
        norm = (t(d, seed=seed + 5, scale=0.2) + 1) if with_norm else None
        rtol = 1e-6 if dtype == torch.float32 else 1e-2
        _merge_step_case(m, case, out1, lse1, partial, update, query, norm, block_m, rtol)

    # Logits z of several hundred and lse1 = z ± 40 or ± 1e4: e^{z} and e^{lse1} overflow float32, σ(z − lse1) does not.
    out1, partial, query = t(16, 32, seed=90), t(16, 32, seed=91), t(32, seed=93, scale=100.0)
    z = reference.rms_norm(partial.to(F64)) @ query.to(F64)
    lse1 = (z + torch.tensor([40.0, -40.0, 1e4, -1e4] * 4, dtype=F64)).to(dev, torch.float32)
    _merge_step_case(m, "logits z ~ ±500, lse1 = z ± 40 or ± 1e4 (e^z, e^{lse1} overflow)", out1, lse1, partial, None,
                     query, None, 4, 1e-6)  # fmt: skip

    big = t(3, 12, 40, seed=95)  # strided views: every other row of a bigger buffer
    _merge_step_case(m, "strided inputs (every other row of a bigger buffer)", big[0, ::2], t(12, seed=96)[::2],
                     big[1, ::2], big[2, ::2], t(40, seed=97), t(40, seed=98, scale=0.2) + 1, 4, 1e-6)  # fmt: skip

    # Tie-in: merging phase 1's result with x is depth attention over [phase-1 sources…, x].
    sources = t(3, 6, 24, seed=100)
    queries, norms = t(2, 24, seed=101, scale=0.5), t(2, 24, seed=102, scale=0.2) + 1
    out1, lse1 = reference.batched_depth_attention(sources, queries, norms)
    partial, update = t(6, 24, seed=103), t(6, 24, seed=104)
    with _quiet():
        h, x = _pair("merge_step", _call(m.merge_step, out1[1], lse1[1], partial, update, queries[1], norms[1]))
    want, _ = reference.depth_attention(
        torch.cat([sources, (partial + update)[None]]).to(F64), queries[1].to(F64), norms[1].to(F64)
    )
    _close("merge_step h vs depth_attention over [3 phase-1 sources, partial + update]", h, want, 1e-6)


# --- exercise 5 ------------------------------------------------------------------------------------------------
EXTREME_SOURCES = "source 0 all zeros, source 2 scaled by 1e4"


def check_ex5_triton_phase1(m) -> None:
    dev = kernel_device()
    cases = [  # (case, N, S, token dims, D, dtype, norm weight, query scale, block_m)
        ("N=1, S=1, one token, D=1", 1, 1, (1,), 1, torch.float32, False, 0.5, 4),
        ("N=1, S=2: out is the source, lse its logit", 1, 2, (5,), 8, torch.float32, True, 0.5, 4),
        ("N=5, S=3, tokens [37] (a partial last tile), D=48", 5, 3, (37,), 48, torch.float32, True, 0.5, 4),
        ("N=9, S=1, tokens [2, 5], D=100 (not a power of two)", 9, 1, (2, 5), 100, torch.float32, False, 0.5, 8),
        ("queries × 30: logits of several hundred (e^z overflows)", 4, 2, (11,), 32, torch.float32, True, 30.0, 4),
        (EXTREME_SOURCES, 3, 2, (6,), 20, torch.float32, False, 0.5, 4),
        ("bfloat16 sources, N=4, S=2, tokens [9], D=64", 4, 2, (9,), 64, torch.bfloat16, True, 0.5, 4),
    ]
    for i, (case, n, s, lead, d, dtype, with_norm, scale, block_m) in enumerate(cases):
        seed = 200 + 10 * i
        sources = randn(n, *lead, d, seed=seed, dtype=F64) * (1 + 3 * rand(n, *lead, 1, seed=seed + 1, dtype=F64))
        if case == EXTREME_SOURCES:
            sources[0] = 0.0  # rms = sqrt(ε): the key is 0, the logit 0
            sources[2] *= 1e4
        sources = sources.to(device=dev, dtype=dtype)
        queries = (scale * randn(s, d, seed=seed + 2, dtype=F64)).to(dev, torch.float32)
        norm = (1 + 0.2 * randn(s, d, seed=seed + 3, dtype=F64)).to(dev, torch.float32) if with_norm else None
        with _recording(m, "_phase1_kernel") as recorder, _poisoned_empty(f"depth_attention_triton {case}"), _quiet():
            got = _call(m.depth_attention_triton, sources, queries, norm, 1e-6, block_m=block_m)
        out, lse = _pair(f"depth_attention_triton [{case}]", got)
        want_out, want_lse = reference.batched_depth_attention(
            sources.to(F64), queries.to(F64), None if norm is None else norm.to(F64)
        )
        for name, tensor, want_dtype in (("out", out, dtype), ("lse", lse, torch.float32)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != want_dtype:
                desc = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise AssertionError(f"depth_attention_triton [{case}]: expected {name} as {want_dtype}, got {desc}")
        lse_hint = (
            "z_i = (u_s·v_i) / sqrt(mean(v_i²) + ε) with u_s = q_s ⊙ g_s; lse = m + log ℓ after the last source, with "
            "ℓ rescaled by e^{m − m'} whenever the max grows. Non-finite values: an e^{z} overflowed (subtract the "
            "running max) or an element was never written (outputs start as NaN)"
        )
        _close(f"depth_attention_triton [{case}] lse [S, ...]", lse, want_lse, 1e-6 if dtype == torch.float32 else 1e-5,
               lse_hint)  # fmt: skip
        out_hint = "acc' = acc·e^{m − m'} + e^{z_i − m'}·v_i (raw v_i, not normalised), out = acc / ℓ"
        _close(f"depth_attention_triton [{case}] out [S, ..., D]", out, want_out,
               1e-5 if dtype == torch.float32 else 1e-2, out_hint)  # fmt: skip
        tokens = math.prod(lead)
        _check_grid(f"depth_attention_triton [{case}]", recorder, (math.ceil(tokens / block_m), s),
                    f"(⌈M / BLOCK_M⌉, S) with M = {tokens} tokens, S = {s} queries")  # fmt: skip

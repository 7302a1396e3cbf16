"""The foundation's own tests: testing/bench/triton helpers, input checks, and the two-tier kernel path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from nanokimi import bench, checks
from nanokimi.testing import assert_close, poisoned_like, rand, randn, rel_err
from nanokimi.triton_utils import autotune_configs, ensure_cuda_or_interpreter, interpreting
from nanokimi.vector_add import vector_add


# --- nanokimi.testing ---------------------------------------------------------------------------------
def test_rel_err_values():
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref, ref) == 0.0
    assert rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_err(torch.tensor([0.0, 2.0]), torch.zeros(2)) == pytest.approx(2.0)


def test_assert_close_passes_on_close_values():
    ref = randn(4, 5, seed=1, dtype=torch.float64)
    assert_close("x", ref.float(), ref, rtol_rel=1e-6)


def test_assert_close_catches_nan():
    ref = randn(8, seed=2)
    out = ref.clone()
    out[3] = float("nan")
    with pytest.raises(AssertionError, match=r"x: 1 non-finite values .*\(3,\)"):
        assert_close("x", out, ref, rtol_rel=1.0)


def test_assert_close_catches_shape_mismatch():
    with pytest.raises(AssertionError, match=r"shape \(2, 3\) != reference shape \(3, 2\)"):
        assert_close("x", torch.zeros(2, 3), torch.zeros(3, 2), rtol_rel=1.0)


def test_assert_close_catches_a_real_error_and_names_the_worst_element():
    ref = torch.ones(4, 4)
    out = ref.clone()
    out[2, 1] = 1.5
    with pytest.raises(AssertionError, match=r"at \(2, 1\): out=1\.5 ref=1"):
        assert_close("x", out, ref, rtol_rel=1e-3)


def test_assert_close_max_abs_bound_applies_when_given():
    ref = torch.zeros(1000)
    ref[0] = 1000.0
    out = ref.clone()
    out[5] = 0.5  # tiny relative error, large absolute error
    assert_close("x", out, ref, rtol_rel=1e-2)
    with pytest.raises(AssertionError, match="max-abs limit 0.1"):
        assert_close("x", out, ref, rtol_rel=1e-2, atol=0.1)


def test_assert_close_accepts_matching_infinities_only():
    ref = torch.tensor([float("-inf"), 1.0])
    assert_close("x", ref.clone(), ref, rtol_rel=0.0)
    with pytest.raises(AssertionError):
        assert_close("x", torch.tensor([0.0, 1.0]), ref, rtol_rel=1.0)


def test_poisoned_like():
    assert torch.isnan(poisoned_like(torch.zeros(3))).all()
    assert (poisoned_like(torch.zeros(3, dtype=torch.int32)) == torch.iinfo(torch.int32).max).all()


def test_seeded_makers_are_deterministic_and_dtype_independent():
    a = randn(3, 4, seed=7)
    assert torch.equal(a, randn(3, 4, seed=7))
    assert not torch.equal(a, randn(3, 4, seed=8))
    assert torch.allclose(randn(3, 4, seed=7, dtype=torch.float64).float(), a)
    u = rand(100, seed=0)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert randn(2, seed=0, requires_grad=True).requires_grad


# --- nanokimi.checks ----------------------------------------------------------------------------------
def test_checks_name_argument_expected_and_actual():
    with pytest.raises(ValueError, match=r"q: expected shape \(2, \*\), got \(3, 4\)"):
        checks.check_tensor("q", torch.zeros(3, 4), shape=(2, None))
    with pytest.raises(ValueError, match="q: expected 3 dimensions, got 2"):
        checks.check_tensor("q", torch.zeros(3, 4), ndim=3)
    with pytest.raises(TypeError, match=r"q: expected dtype in \(float32\), got int64"):
        checks.check_tensor("q", torch.zeros(3, dtype=torch.long), dtypes=(torch.float32,))
    with pytest.raises(TypeError, match="q: expected a torch.Tensor, got list"):
        checks.check_tensor("q", [1.0])
    with pytest.raises(ValueError, match="topk: expected a positive int, got 0"):
        checks.check_positive_int("topk", 0)
    with pytest.raises(TypeError, match="topk: expected a positive int, got bool"):
        checks.check_positive_int("topk", True)
    with pytest.raises(ValueError, match=r"mode: expected one of \['a', 'b'\], got 'c'"):
        checks.check_in("mode", "c", ["a", "b"])
    with pytest.raises(ValueError, match=r"g: expected finite values, got 1 NaN/inf \(first at \(1,\)\)"):
        checks.check_finite("g", torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match="g: expected values <= 0"):
        checks.check_range("g", torch.tensor([-1.0, 0.5]), high=0)
    with pytest.raises(ValueError, match=r"k: expected shape \(2,\) \(that of q\), got \(3,\)"):
        checks.check_same_shape(("q", "k"), torch.zeros(2), torch.zeros(3))


# --- nanokimi.triton_utils ----------------------------------------------------------------------------
def test_interpreter_flag_is_set_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: kernels run compiled")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert interpreting()


def test_interpreter_flag_is_set_on_a_fresh_import():
    """The flag is set by `import nanokimi` itself, not by the test runner."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import os, torch, nanokimi; print(os.environ.get('TRITON_INTERPRET'), torch.cuda.is_available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    flag, cuda = out.stdout.split()
    assert flag == ("None" if cuda == "True" else "1")


def test_importing_triton_first_warns_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton, torch, warnings; warnings.simplefilter('error'); print(torch.cuda.is_available()); import nanokimi"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.stdout.strip() == "True":
        pytest.skip("a CUDA device is present: kernels run compiled")
    assert out.returncode != 0 and "import nanokimi first" in out.stderr


def test_autotune_configs_collapse_under_interpreter():
    cfgs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    got = autotune_configs(cfgs)
    assert got == (cfgs[:1] if interpreting() else cfgs)
    with pytest.raises(ValueError, match="at least one"):
        autotune_configs([])


def test_ensure_cuda_or_interpreter_rejects_the_wrong_device():
    wrong = torch.zeros(2) if not interpreting() else torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="x: expected a"):
        ensure_cuda_or_interpreter(wrong, names=["x"])


# --- the two-tier kernel path -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 100, 1024, 3000])
def test_vector_add_matches_torch(n, device):
    x, y = randn(n, seed=0, device=device), randn(n, seed=1, device=device)
    assert_close("out", vector_add(x, y, block=256), x + y, rtol_rel=0.0)


def test_vector_add_bad_input(device):
    with pytest.raises(ValueError, match=r"y: expected shape \(3,\) \(that of x\), got \(4,\)"):
        vector_add(torch.zeros(3, device=device), torch.zeros(4, device=device))
    with pytest.raises(TypeError, match="x: expected dtype"):
        vector_add(torch.zeros(3, dtype=torch.long, device=device), torch.zeros(3, dtype=torch.long, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4097, 10_000_019])
def test_vector_add_compiled_on_gpu(n):
    assert not interpreting(), "on the GPU the kernels must run compiled"
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(n, seed=0, device="cuda", dtype=dtype)
        y = randn(n, seed=1, device="cuda", dtype=dtype)
        assert_close(f"out[{dtype}]", vector_add(x, y), x + y, rtol_rel=0.0)


# --- nanokimi.bench -----------------------------------------------------------------------------------
def test_time_ms_refuses_without_cuda():
    if torch.cuda.is_available():
        assert bench.time_ms(lambda: torch.zeros(1, device="cuda")) > 0
    else:
        with pytest.raises(RuntimeError, match="need a CUDA device"):
            bench.time_ms(lambda: None)


def test_gpu_slug():
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.gpu_slug("NVIDIA H200") == "h200"
    assert bench.gpu_slug("cpu") == "cpu"


def test_table_json_markdown_plot_and_readme(tmp_path):
    t = bench.Table("demo")
    row = t.add("ns5", "4096x4096", 2.0, "torch", 3.0, tflops=100.0, roofline_frac=0.13, gbps=1.5)
    assert row["speedup"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="ours_ms"):
        t.add("bad", "1", 0.0, "torch", 1.0)
    (tmp_path / "README.md").write_text("# ch\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ntail\n")
    path = t.save(tmp_path)
    data = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "date", "commit", "rows"):
        assert key in data
    assert set(bench.Table.columns) <= set(data["rows"][0])
    assert (tmp_path / "results" / f"{path.stem}.png").stat().st_size > 0
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and "| ns5 | 4096x4096 | 2 | torch | 3 | 1.5 | 100 | 0.13 | 1.5 |" in readme
    assert readme.endswith("<!-- bench:end -->\ntail\n")


def test_poisoned_empty_poisons_only_while_active():
    from nanokimi.testing import poisoned_empty

    real_empty, real_empty_like = torch.empty, torch.empty_like
    with poisoned_empty():
        assert bool(torch.empty(3).isnan().all())
        assert bool((torch.empty_like(torch.zeros(2, dtype=torch.int32)) == torch.iinfo(torch.int32).max).all())
    assert torch.empty is real_empty and torch.empty_like is real_empty_like


def test_check_attempt_close_names_type_shape_dtype_and_hint():
    from nanokimi.testing import check_attempt_close

    want = torch.zeros(2, 3)
    check_attempt_close("x", torch.zeros(2, 3), want, 1e-6)
    with pytest.raises(AssertionError, match="x: expected a torch.Tensor, got list"):
        check_attempt_close("x", [0.0], want, 1e-6)
    with pytest.raises(AssertionError, match=r"x: shape \(3, 2\), expected \(2, 3\)"):
        check_attempt_close("x", torch.zeros(3, 2), want, 1e-6)
    with pytest.raises(AssertionError, match="x: dtype torch.float64, expected torch.float32"):
        check_attempt_close("x", torch.zeros(2, 3, dtype=torch.float64), want, 1e-6)
    with pytest.raises(AssertionError, match="hint: add the bias"):
        check_attempt_close("x", torch.ones(2, 3), want, 1e-6, hint="add the bias")

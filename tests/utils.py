"""What every op test shares: the backend x device grid, the tolerance table, and torch-parity helpers."""
import contextlib

import pytest
import torch

import pyengine

HAS_CUDA = torch.cuda.is_available() and "cuda" in pyengine.available_backends()
_no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and pyengine's CUDA kernels")
_no_cpp = pytest.mark.skipif("cpp" not in pyengine.available_backends(), reason="pyengine._C is not built")

# (backend, device): the compiled backend for each device, and the python reference on each device.
BACKEND_DEVICES = [
    pytest.param("cpp", "cpu", id="cpp-cpu", marks=_no_cpp),
    pytest.param("python", "cpu", id="python-cpu"),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=_no_cuda),
    pytest.param("python", "cuda", id="python-cuda", marks=_no_cuda),
]
COMPILED_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "python"]

FLOAT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# The one tolerance table. float64 and float32 compare with torch directly; float16/bfloat16 compare errors
# against a float64 reference instead (assert_half_close), since torch's own half result is itself inexact.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),  # atol: sums that cancel lose digits in any order
}
# In half precision pyengine's error against float64 may be at most HALF_ERROR_FACTOR times torch's own error
# in that dtype, plus HALF_ATOL (one rounding of a value near 1) for results torch happens to get exactly.
HALF_ERROR_FACTOR = 2.0
HALF_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@contextlib.contextmanager
def on(backend):
    with pyengine.use_backend(backend):
        yield


def assert_close(actual, expected, dtype=None):
    """actual against torch's result: exact dtype and shape, values within TOL, NaN where torch has NaN."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def assert_half_close(actual, torch_result, reference64):
    """float16/bfloat16: pyengine's max error against the float64 reference is at most HALF_ERROR_FACTOR
    times torch's own, plus HALF_ATOL scaled by the reference's magnitude."""
    assert actual.shape == torch_result.shape and actual.dtype == torch_result.dtype
    ref = reference64.double()
    ours = (actual.double() - ref).abs().nan_to_num(posinf=0.0)
    theirs = (torch_result.double() - ref).abs().nan_to_num(posinf=0.0)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch_worst = theirs.max().item() if theirs.numel() else 0.0
    bound = HALF_ERROR_FACTOR * torch_worst + HALF_ATOL[actual.dtype] * max(scale, 1.0)
    worst = ours.max().item() if ours.numel() else 0.0
    assert worst <= bound, (f"{actual.dtype}: max error {worst:.3g} against float64, bound {bound:.3g} "
                            f"(torch's error {torch_worst:.3g})")
    assert torch.equal(actual.isnan(), torch_result.isnan()), "NaN in different places than torch"


def assert_raises_like(torch_call, our_call):
    """Where torch raises, pyengine raises the same exception type (and never crashes or returns)."""
    with pytest.raises(Exception) as torch_exc:
        torch_call()
    with pytest.raises(type(torch_exc.value)):
        our_call()


def make(shape, dtype, device, requires_grad=False, low=-3.0, high=3.0, noncontiguous=False):
    """Fresh uniform values in [low, high); noncontiguous=True gives a strided view of the same shape."""
    if noncontiguous:
        big = torch.empty((*shape, 2), dtype=dtype, device=device).uniform_(low, high)
        t = big[..., 0]
    else:
        t = torch.empty(tuple(shape), dtype=dtype, device=device).uniform_(low, high)
    return t.requires_grad_(requires_grad)


def grads(out, inputs, grad_out=None):
    """Gradients of out (with a fresh random incoming gradient when none is given) w.r.t. inputs."""
    if grad_out is None:
        grad_out = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True), grad_out

import math

import pytest
import torch

import pyengine.functional as PF
from activation_cases import *  # noqa: F401,F403  (the shared activation tests, run here for relu)
from utils import BACKEND_DEVICES, COMPILED_DEVICES, on


@pytest.fixture
def activation():
    return PF.relu, torch.relu


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bool_input_raises_like_torch(backend, device):
    with on(backend), pytest.raises(NotImplementedError):
        PF.relu(torch.tensor([True, False], device=device))


def test_backward_is_the_sign_of_the_output():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0], requires_grad=True)
    PF.relu(x).backward(torch.full_like(x, 5.0))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 5.0, 5.0]


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_kernel_rejects_mismatched_shapes(backend, device):
    from pyengine._backend import _C

    y = torch.rand(4, 5, device=device)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        _C.relu_backward(torch.rand(5, 4, device=device), y)
    with pytest.raises(RuntimeError, match="floating-point"):
        _C.relu_forward(torch.ones(3, dtype=torch.int64, device=device))


def _special_values(dtype):
    """Every bit pattern of a 16-bit float type; for float32 and float64 the signed zeros, infinities, NaNs of
    both signs, denormals and ordinary values, repeated past a vector's width so the tail loops see them too."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    tiny = torch.finfo(dtype).tiny
    values = torch.tensor([-0.0, 0.0, -math.inf, math.inf, math.nan, -1.5, 2.5, tiny / 4, -tiny / 4, tiny, -tiny],
                          dtype=dtype)
    values = torch.cat([values, -torch.tensor([math.nan], dtype=dtype)])
    return values.repeat(13)


def _same_bits(a, b):
    """Equal bit for bit, any NaN matching any NaN (payloads are not part of torch's contract)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_signed_zeros_nans_and_every_half_bit_pattern_as_torch(backend, device, dtype):
    # relu keeps NaN (and -0 as torch does on the device), and its gradient passes where y > 0 or y is NaN
    # (torch's threshold_backward); the CPU's half types select bits without widening (csrc/cpu/elementwise.h)
    x = _special_values(dtype).to(device)
    dy = torch.randn(x.shape, dtype=torch.float32, device=device).to(dtype)
    with on(backend):
        xg = x.clone().requires_grad_()
        y = PF.relu(xg)
        y.backward(dy)
    xt = x.clone().requires_grad_()
    yt = torch.relu(xt)
    yt.backward(dy)
    assert _same_bits(y.detach(), yt.detach())
    assert _same_bits(xg.grad, xt.grad)

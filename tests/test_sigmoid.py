import pytest
import torch

import pyengine.functional as PF
from activation_cases import *  # noqa: F401,F403  (the shared activation tests, run here for sigmoid)
from utils import BACKEND_DEVICES, on


@pytest.fixture
def activation():
    return PF.sigmoid, torch.sigmoid


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_saturation_gives_vanishing_gradient(backend, device):
    """The origin notes' sigmoid saturation: far from 0 the output pins to 0 or 1 and y(1 - y) vanishes."""
    x = torch.tensor([-40.0, -10.0, 0.0, 10.0, 40.0], dtype=torch.float64, device=device, requires_grad=True)
    with on(backend):
        y = PF.sigmoid(x)
        y.sum().backward()
    assert y[2].item() == 0.5 and x.grad[2].item() == 0.25  # the steepest point
    assert y[0].item() < 1e-17 and y[4].item() == 1.0
    assert x.grad[0].item() < 1e-17 and x.grad[4].item() == 0.0
    assert x.grad[1].item() < 5e-5


def float32_ulps(y, ref64):
    """|y - ref64| in units of the last place of ref64 rounded to float32 (denormal spacing below 2^-126)."""
    r = ref64.float().abs()
    spacing = (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()
    return (y.double() - ref64).abs() / spacing


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_float32_accuracy_over_the_whole_range(backend, device):
    """Every float32 sigmoid runs the kernels' own exp (csrc/cpu/vec_math.h pe_exp on AVX-512): over all of exp's
    range its error in float32 ulps is torch's own, to half an ulp, and where 1 + e^-x overflows (x below -88.72)
    the result is torch's 0, not a denormal from elsewhere."""
    x = torch.linspace(-88.72, 104.0, 400_009, dtype=torch.float32, device=device)
    with on(backend):
        y = PF.sigmoid(x)
    ref = torch.sigmoid(x.double())
    ours, theirs = float32_ulps(y, ref), float32_ulps(torch.sigmoid(x), ref)
    assert ours.max() <= theirs.max() + 0.5, (ours.max().item(), x[ours.argmax()].item(), theirs.max().item())
    assert ours.mean() <= theirs.mean() * 1.25 + 0.01, (ours.mean().item(), theirs.mean().item())
    below = torch.linspace(-120.0, -88.73, 10_007, dtype=torch.float32, device=device)
    with on(backend):
        assert torch.equal(PF.sigmoid(below), torch.sigmoid(below))

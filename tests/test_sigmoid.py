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

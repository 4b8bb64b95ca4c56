import pytest
import torch

import pyengine.functional as PF
from activation_cases import *  # noqa: F401,F403  (the shared activation tests, run here for tanh)
from utils import BACKEND_DEVICES, on


@pytest.fixture
def activation():
    return PF.tanh, torch.tanh


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_saturation(backend, device):
    x = torch.tensor([-30.0, 0.0, 30.0], dtype=torch.float64, device=device, requires_grad=True)
    with on(backend):
        y = PF.tanh(x)
        y.sum().backward()
    assert y.tolist() == [-1.0, 0.0, 1.0]
    assert x.grad.tolist() == [0.0, 1.0, 0.0]

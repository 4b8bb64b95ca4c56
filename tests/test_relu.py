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

import pytest
import torch
import torch.nn.functional as F

import pyengine.functional as PF
import pyengine.nn as pnn
from activation_cases import (test_forward_backward_match_torch, test_gradcheck,  # noqa: F401  (shared tests)
                              test_grad_accumulates_and_retain_graph, test_half_precision_error_within_twice_torch,
                              test_noncontiguous_input, test_special_values_match_torch)
from utils import BACKEND_DEVICES, assert_close, assert_raises_like, grads, make, on


@pytest.fixture(params=[0.01, 0.2, 0.0, -0.5, 1.5], ids=lambda s: f"slope{s}")
def activation(request):
    slope = request.param
    return (lambda x: PF.leaky_relu(x, slope)), (lambda x: F.leaky_relu(x, slope))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_module_and_default_slope(backend, device):
    x = make((40, 3), torch.float32, device, requires_grad=True)
    with on(backend):
        y = pnn.LeakyReLU()(x)
        (g,), gy = grads(y, [x])
    (g_ref,), _ = grads(F.leaky_relu(x), [x], gy)
    assert_close(y, F.leaky_relu(x))
    assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_integer_input_raises_like_torch(backend, device):
    x = torch.tensor([1, -2], device=device)
    with on(backend):
        assert_raises_like(lambda: F.leaky_relu(x), lambda: PF.leaky_relu(x), "not implemented for 'Long'")

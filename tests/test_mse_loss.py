import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
import pyengine.nn as pnn
from utils import (BACKEND_DEVICES, COMPILED_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close,
                   assert_raises_like, backward_aten_calls, grads, magnitude, make, on)

SHAPES = [(), (0,), (1,), (17,), (4, 33), (3, 5, 7), (50001,)]
REDUCTIONS = ["mean", "sum", "none"]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_backward_match_torch(backend, device, dtype, shape, reduction):
    x = make(shape, dtype, device, requires_grad=True)
    y = make(shape, dtype, device, requires_grad=True)
    with on(backend):
        loss = PF.mse_loss(x, y, reduction=reduction)
        ours, g = grads(loss, [x, y])
    ref_loss = F.mse_loss(x, y, reduction=reduction)
    ref, _ = grads(ref_loss, [x, y], g)
    assert_close(loss, ref_loss)
    for a, b in zip(ours, ref):
        assert_close(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("incoming", ["one", "random"])
def test_fixed_target_matches_torch(backend, device, dtype, shape, reduction, incoming):
    """The usual training call, a reduced loss whose input alone wants a gradient: the compiled backend's forward
    computes the gradient with the loss (mse_loss_forward_with_grad) and its backward returns it for an incoming 1,
    scales it for any other."""
    x = make(shape, dtype, device, requires_grad=True)
    y = make(shape, dtype, device)
    g = torch.ones((), dtype=dtype, device=device) if incoming == "one" else None
    with on(backend):
        loss = PF.mse_loss(x, y, reduction=reduction)
        (gx,), g = grads(loss, [x], g)
    ref_loss = F.mse_loss(x, y, reduction=reduction)
    (gx_ref,), _ = grads(ref_loss, [x], g)
    assert_close(loss, ref_loss)
    assert_close(gx, gx_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@pytest.mark.parametrize("n", [0, 1, 17, 70001])  # below a vector, a vector and a tail, several parallel chunks
def test_forward_with_grad_is_the_forward_and_the_backward_for_one(backend, device, dtype, reduction, n):
    """The kernels' contract: the training forward's loss is the forward's bit for bit (the same sums in the same
    order), and its gradient the backward's for an incoming 1 to a rounding (the compiler may fuse multiply-adds
    differently in the two loops)."""
    x, y = make((n,), dtype, device), make((n,), dtype, device)
    with on(backend):
        kernels = pyengine._backend.kernels(torch.device(device))
        loss, gx = kernels.mse_loss_forward_with_grad(x, y, reduction)
        one = torch.ones((), dtype=dtype, device=device)
        loss_forward = kernels.mse_loss_forward(x, y, reduction)
        gx_backward, none = kernels.mse_loss_backward(one, x, y, reduction, True, False)
    torch.testing.assert_close(loss, loss_forward, rtol=0, atol=0, equal_nan=True)  # NaN: the mean of nothing
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gx, gx_backward, rtol=eps, atol=eps * magnitude(gx_backward))
    assert none is None
    with on(backend), pytest.raises(RuntimeError, match="reduction must be mean or sum"):
        kernels.mse_loss_forward_with_grad(x, y, 0)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_of_a_fixed_target_makes_no_input_sized_tensor(backend, device, dtype):
    """The backward returns the gradient the forward computed (scales it, for an incoming gradient other than 1)
    instead of reading input and target again."""
    x = make((33, 7), dtype, device, requires_grad=True)
    y = make((33, 7), dtype, device)
    for incoming in (1.0, 2.5):
        x.grad = None
        with on(backend):
            calls = backward_aten_calls(PF.mse_loss(x, y) * incoming)
        assert not [c for c in calls if c[0].startswith("empty") and c[1] == x.shape], calls
        ref = x.detach().requires_grad_()
        (F.mse_loss(ref, y) * incoming).backward()
        assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_error_within_twice_torch(backend, device, dtype, reduction):
    x = make((257, 3), dtype, device, requires_grad=True, low=-1, high=1)
    y = make((257, 3), dtype, device, low=-1, high=1)
    with on(backend):
        loss = PF.mse_loss(x, y, reduction=reduction)
        (gx,), g = grads(loss, [x])
    torch_loss = F.mse_loss(x, y, reduction=reduction)
    (gx_torch,), _ = grads(torch_loss, [x], g)
    x64 = x.detach().double().requires_grad_()
    loss64 = F.mse_loss(x64, y.double(), reduction=reduction)
    (gx64,), _ = grads(loss64, [x64], g.double())
    assert_half_close(loss, torch_loss, loss64)
    assert_half_close(gx, gx_torch, gx64)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, device, reduction):
    x = make((3, 4), torch.float64, device, requires_grad=True)
    y = make((3, 4), torch.float64, device, requires_grad=True)
    with on(backend):
        assert torch.autograd.gradcheck(lambda a, b: PF.mse_loss(a, b, reduction=reduction), (x, y))
        # a fixed target: the gradient from the forward (test_fixed_target_matches_torch), and its double backward
        assert torch.autograd.gradcheck(lambda a: PF.mse_loss(a, y.detach(), reduction=reduction), (x,))
        assert torch.autograd.gradgradcheck(lambda a: PF.mse_loss(a, y.detach(), reduction=reduction), (x,))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_broadcast_warns_and_matches_torch(backend, device):
    x = make((4, 1), torch.float64, device, requires_grad=True)
    y = make((3,), torch.float64, device, requires_grad=True)
    with on(backend), pytest.warns(UserWarning, match="different to the input size"):
        loss = PF.mse_loss(x, y)
    ours, g = grads(loss, [x, y])
    with pytest.warns(UserWarning):
        ref_loss = F.mse_loss(x, y)
    ref, _ = grads(ref_loss, [x, y], g)
    assert_close(loss, ref_loss)
    for a, b in zip(ours, ref):
        assert_close(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_linear_model_of_the_notes_learns_y_equals_2x(backend, device):
    """The notes' LinearModel: x = [1, 2, 3], y = [2, 4, 6], MSELoss(sum), SGD lr 0.01, 500 epochs."""
    torch.manual_seed(0)
    model = pnn.Linear(1, 1).to(device)
    criterion = pnn.MSELoss(reduction="sum")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.tensor([[1.0], [2.0], [3.0]], device=device)
    y = torch.tensor([[2.0], [4.0], [6.0]], device=device)
    with on(backend):
        for _ in range(500):
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
    assert abs(model.weight.item() - 2.0) < 0.05 and abs(model.bias.item()) < 0.1


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_bad_input_raises_like_torch(backend, device):
    x, y = torch.rand(3, device=device), torch.rand(4, device=device)
    with on(backend):
        assert_raises_like(lambda: F.mse_loss(x, y), lambda: PF.mse_loss(x, y),
                           r"size of tensor a \(3\) must match the size of tensor b \(4\) at non-singleton dimension 0")
        assert_raises_like(lambda: F.mse_loss(x, x, reduction="avg"), lambda: PF.mse_loss(x, x, reduction="avg"),
                           "avg is not a valid value for reduction")

"""torch.func over pyengine's ops: vmap, grad, per-sample gradients (vmap of grad), jacrev and jvp give torch's
values under the same transform, on every backend; a transform an op does not support raises a clear error."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import pyengine
import pyengine.functional as PF
from op_cases import OPS
from utils import BACKEND_DEVICES, assert_close, on

# ops whose backward is first-order only: no forward-mode AD either (a clear error), and no second derivative
NO_JVP = ("cross_entropy", "fused_mlp", "linear_cross_entropy")
SHAPE = (4, 5)
BATCH = 3


def _samples(name, device, dtype):
    """The op, torch's op, and BATCH samples of its arguments stacked along a new dim 0 (detached: torch.func
    differentiates by its own means)."""
    ours, theirs, _ = OPS[name](device, dtype, SHAPE)
    draws = [OPS[name](device, dtype, SHAPE)[2] for _ in range(BATCH)]
    stacked = tuple(torch.stack([d[i].detach() for d in draws]) for i in range(len(draws[0])))
    return ours, theirs, stacked


def _summed(fn):
    return lambda *args: fn(*args).sum()


def _float_argnums(args):
    return tuple(i for i, a in enumerate(args) if a.is_floating_point())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("batched", ["all", "first"])
def test_vmap(name, backend, device, batched):
    ours, theirs, args = _samples(name, device, torch.float64)
    in_dims = 0 if batched == "all" else (0,) + (None,) * (len(args) - 1)
    if batched == "first":  # the other arguments shared: one sample's
        args = (args[0],) + tuple(a[0] for a in args[1:])
    with on(backend):
        out = vmap(ours, in_dims)(*args)
    assert_close(out, vmap(theirs, in_dims)(*args))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", list(OPS))
def test_grad_and_per_sample_grad(name, backend, device):
    ours, theirs, args = _samples(name, device, torch.float64)
    argnums = _float_argnums(args)
    one = tuple(a[0] for a in args)
    with on(backend):
        single = grad(_summed(ours), argnums)(*one)
        per_sample = vmap(grad(_summed(ours), argnums))(*args)
    for got, want in zip(single, grad(_summed(theirs), argnums)(*one)):
        assert_close(got, want)
    for got, want in zip(per_sample, vmap(grad(_summed(theirs), argnums))(*args)):
        assert_close(got, want)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", list(OPS))
def test_jacrev(name, backend, device):
    ours, theirs, args = _samples(name, device, torch.float64)
    one = tuple(a[0] for a in args)
    with on(backend):
        jacobian = jacrev(ours)(*one)
    assert_close(jacobian, jacrev(theirs)(*one))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", list(OPS))
def test_jvp_and_jacfwd(name, backend, device):
    ours, theirs, args = _samples(name, device, torch.float64)
    one = tuple(a[0] for a in args)
    argnums = _float_argnums(one)
    tangents = tuple(torch.randn_like(one[i]) for i in argnums)

    def along(fn):  # fn of the differentiable arguments alone, the others fixed
        def call(*floats):
            full = list(one)
            for i, t in zip(argnums, floats):
                full[i] = t
            return fn(*full)
        return call

    primals = tuple(one[i] for i in argnums)
    with on(backend):
        if name in NO_JVP:
            with pytest.raises(NotImplementedError, match=f"pyengine.{name} has no forward-mode AD"):
                jvp(along(ours), primals, tangents)
            return
        out, tangent_out = jvp(along(ours), primals, tangents)
        jacobian = jacfwd(ours)(*one)
    want_out, want_tangent = jvp(along(theirs), primals, tangents)
    assert_close(out, want_out)
    assert_close(tangent_out, want_tangent, scale=max(a.abs().max().item() for a in primals) ** 2)
    assert_close(jacobian, jacfwd(theirs)(*one))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_forward_ad_outside_torch_func(backend, device):
    """torch.autograd.forward_ad dual tensors take the Python Functions' jvp too (the C++ nodes have none)."""
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    w = torch.randn(3, 5, dtype=torch.float64, device=device)
    tangent = torch.randn_like(x)
    results = []
    for linear, relu in ((PF.linear, PF.relu), (F.linear, torch.relu)):
        with on(backend) if linear is PF.linear else torch.no_grad(), torch.autograd.forward_ad.dual_level():
            out = relu(linear(torch.autograd.forward_ad.make_dual(x, tangent), w))
            results.append(torch.autograd.forward_ad.unpack_dual(out))
    assert_close(results[0].primal, results[1].primal)
    assert_close(results[0].tangent, results[1].tangent)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_per_sample_gradients_of_a_converted_mlp(backend, device):
    """The per-sample gradient recipe (functional_call + vmap(grad)) over a model pyengine.nn.convert swapped,
    against the same recipe over torch.nn's."""
    torch_model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                                      torch.nn.LeakyReLU(0.1), torch.nn.Linear(8, 3)).to(device, torch.float64)
    model = pyengine.nn.convert(copy.deepcopy(torch_model))
    params = {k: v.detach() for k, v in torch_model.named_parameters()}
    x = torch.randn(7, 5, dtype=torch.float64, device=device)
    t = torch.randint(0, 3, (7,), device=device)

    def per_sample(m, loss):
        def one(p, xi, ti):
            return loss(functional_call(m, p, (xi.unsqueeze(0),)), ti.unsqueeze(0))
        return vmap(grad(one), (None, 0, 0))(params, x, t)

    with on(backend):
        ours = per_sample(model, PF.cross_entropy)
    theirs = per_sample(torch_model, F.cross_entropy)
    for key in params:
        assert ours[key].shape == (7, *params[key].shape)
        assert_close(ours[key], theirs[key])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("name", NO_JVP)
def test_second_derivative_of_a_first_order_op_raises(name, backend, device):
    """hessian / jacrev(jacrev) through an op whose backward is not differentiable: an error that names the op,
    never a silently zero second derivative."""
    ours, _, args = _samples(name, device, torch.float64)
    one = tuple(a[0] for a in args)
    with on(backend), pytest.raises(RuntimeError, match=f"pyengine.{name} has no double backward"):
        jacrev(jacrev(_summed(ours)))(*one)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_vmap_keeps_float32_values_and_dtypes(backend, device):
    x = torch.randn(BATCH, 9, 7, device=device)
    w = torch.randn(4, 7, device=device)
    with on(backend):
        out = vmap(lambda t: PF.sigmoid(PF.linear(t, w)))(x)
    assert_close(out, torch.sigmoid(F.linear(x, w)))

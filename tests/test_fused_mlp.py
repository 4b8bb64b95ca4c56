"""fused_mlp and nn.FusedMLP against the unfused torch composition: nn.Sequential(Linear, act, ..., Linear)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
import pyengine.nn as pnn
from utils import (BACKEND_DEVICES, COMPILED_DEVICES, FLOAT_DTYPES, HALF_DTYPES, TORCH_ACTIVATIONS, assert_close,
                   assert_half_close, backward_aten_calls, grads, layer_terms, magnitude, make, on, product_magnitudes,
                   relu_kink_slack)

# (sizes, batch shape, activation, output_activation): the notes' MLP, one layer, widths 1, 3, 127 and 128,
# rows around the CPU block of 64 and across several blocks, leading batch dims, 0 rows, no activation.
CASES = [
    ([8, 6, 4, 1], (759,), "sigmoid", None),
    ([3, 1], (5,), "relu", "sigmoid"),
    ([1, 3, 127, 128], (65,), "relu", None),
    ([128, 128, 5], (2, 3, 11), "sigmoid", "relu"),
    ([5, 7, 7, 7, 2], (0,), "relu", "sigmoid"),
    ([4, 9, 3], (64,), None, None),
    ([6, 128, 1], (130,), "relu", "relu"),
    ([2, 5, 3], (63,), "sigmoid", "sigmoid"),
]


def _params(sizes, dtype, device, requires_grad=True):
    """Weights (out, in) in +-1/sqrt(in) (the scale nn.Linear draws from) and biases, fresh every call."""
    weights, biases = [], []
    for n_in, n_out in zip(sizes, sizes[1:]):
        bound = 1 / math.sqrt(n_in)
        weights.append(make((n_out, n_in), dtype, device, low=-bound, high=bound).requires_grad_(requires_grad))
        biases.append(make((n_out,), dtype, device, low=-bound, high=bound).requires_grad_(requires_grad))
    return weights, biases


def assert_network_close(x, weights, biases, activation, output_activation, y, y_ref, ours, ref, gy):
    """y and the gradients of (x, *weights, *biases) against torch's, each judged by the size of the terms it
    sums (utils.product_magnitudes): a bias gradient sums a term per row, and those can cancel far below them,
    where float32's rounding (ours and torch's, in different orders) is set by the terms, not by the sum."""
    acts = [activation] * (len(weights) - 1) + [output_activation]
    m_y, layer_m, m_x = product_magnitudes(x.reshape(-1, x.shape[-1]), list(zip(weights, biases, acts)),
                                           gy.reshape(-1, gy.shape[-1]))
    assert_close(y, y_ref, scale=magnitude(m_y))
    for g, g_ref, m in zip(ours, ref, [m_x, *(m_w for m_w, _ in layer_m), *(m_b for _, m_b in layer_m)]):
        assert_close(g, g_ref, scale=magnitude(m))


def torch_mlp(x, weights, biases, activation, output_activation):
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.linear(x, w, b)
        x = TORCH_ACTIVATIONS[activation if i < len(weights) - 1 else output_activation](x)
    return x


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sizes,batch,activation,output_activation", CASES, ids=str)
def test_forward_and_every_gradient_match_torch(backend, device, dtype, sizes, batch, activation, output_activation):
    x = make((*batch, sizes[0]), dtype, device, requires_grad=True)
    weights, biases = _params(sizes, dtype, device)
    inputs = [x, *weights, *biases]
    with on(backend):
        y = PF.fused_mlp(x, weights, biases, activation, output_activation)
        ours, gy = grads(y, inputs)
    y_ref = torch_mlp(x, weights, biases, activation, output_activation)
    ref, _ = grads(y_ref, inputs, gy)
    assert_network_close(x, weights, biases, activation, output_activation, y, y_ref, ours, ref, gy)


def _draw_away_from_relu_kinks(make_x, sizes, device, activation, tries=100):
    """Fresh x, weights and biases whose hidden pre-activations all lie clear of relu's kink: where the float64
    z is within float32 rounding of its terms' size from 0 (here 1e-6 of it, 8 float32 epsilons; the size as
    product_magnitudes takes it), a product summed in another order can land on the other side, and relu's
    derivative (0 or 1) with it, for ours and torch's alike (one such unit moved 27 of a row's 32 input
    gradients by 3.7e-4 in one CI run). About one draw in five of the test's network is clear. Other
    activations take the first draw."""
    for _ in range(tries):
        x = make_x()
        weights, biases = _params(sizes, torch.float32, device)
        if activation != "relu":
            return x, weights, biases
        hidden = [(w, b, "relu") for w, b in zip(weights[:-1], biases[:-1])]
        if all(bool((z.abs() > 1e-6 * m_z).all()) for _, _, _, z, m_z, _, _ in layer_terms(x, hidden)[0]):
            return x, weights, biases
    raise AssertionError(f"no draw of {tries} kept every relu pre-activation clear of 0")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["layer_gemms", "blocked"])
@pytest.mark.parametrize("activation,output_activation", [("relu", "sigmoid"), ("sigmoid", None), (None, "relu")])
# 1: a one-output head, whose layer runs linear's one-output kernels (cpu/linear_single_output.h) among the GEMMs
@pytest.mark.parametrize("outputs", [3, 1])
def test_float32_network_with_enough_work_for_layer_gemms(backend, device, deterministic, activation,
                                                           output_activation, outputs):
    # 1027 x (32*64 + 64*65 + 65*outputs) multiply-adds: the CPU's layer GEMMs, or its blocked loop when
    # deterministic
    x, weights, biases = _draw_away_from_relu_kinks(lambda: make((1027, 32), torch.float32, device,
                                                                 requires_grad=True),
                                                    [32, 64, 65, outputs], device, activation)
    inputs = [x, *weights, *biases]
    saved = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        with on(backend):
            y = PF.fused_mlp(x, weights, biases, activation, output_activation)
            ours, gy = grads(y, inputs)
    finally:
        torch.use_deterministic_algorithms(saved)
    y_ref = torch_mlp(x, weights, biases, activation, output_activation)
    ref, _ = grads(y_ref, inputs, gy)
    assert_network_close(x, weights, biases, activation, output_activation, y, y_ref, ours, ref, gy)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_inputs_and_weights(backend, device):
    x = make((70, 9), torch.float64, device, requires_grad=True, noncontiguous=True)
    w0 = make((9, 12), torch.float64, device).t().requires_grad_()  # a transposed view, (12, 9)
    b0 = make((12, 2), torch.float64, device)[:, 0].requires_grad_()
    w1, b1 = make((3, 12), torch.float64, device, True), make((3,), torch.float64, device, True)
    inputs = [x, w0, w1, b0, b1]
    with on(backend):
        y = PF.fused_mlp(x, [w0, w1], [b0, b1], "sigmoid")
        ours, gy = grads(y, inputs)
    y_ref = torch_mlp(x, [w0, w1], [b0, b1], "sigmoid", None)
    ref, _ = grads(y_ref, inputs, gy)
    assert_close(y, y_ref)
    for g, g_ref in zip(ours, ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("wanted", ["input", "params"])
def test_only_the_needed_gradients(backend, device, wanted):
    x = make((100, 5), torch.float64, device, requires_grad=wanted == "input")
    weights, biases = _params([5, 8, 2], torch.float64, device, requires_grad=wanted == "params")
    inputs = [x] if wanted == "input" else [*weights, *biases]
    with on(backend):
        ours, gy = grads(PF.fused_mlp(x, weights, biases, "relu", "sigmoid"), inputs)
    ref, _ = grads(torch_mlp(x, weights, biases, "relu", "sigmoid"), inputs, gy)
    for g, g_ref in zip(ours, ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("activation,output_activation", [("sigmoid", None), ("relu", "sigmoid")])
# the CPU's blocked float32 loop, and a network with enough work for its layer-by-layer half-precision GEMMs
# where the CPU multiplies the dtype fast (PYENGINE_HALF_GEMM=off keeps the blocked loop)
# "head": one output, whose layer runs linear's one-output kernels (cpu/linear_single_output.h) among the GEMMs
@pytest.mark.parametrize("sizes,rows", [([16, 32, 8, 3], 150), ([32, 64, 65, 3], 1027), ([32, 64, 65, 1], 1027)],
                         ids=["small", "wide", "head"])
@pytest.mark.parametrize("half_gemm", ["on", "off"])
def test_half_precision_error_within_twice_torch(backend, device, dtype, activation, output_activation, sizes, rows,
                                                 half_gemm, monkeypatch):
    monkeypatch.setenv("PYENGINE_HALF_GEMM", half_gemm)
    x = make((rows, sizes[0]), dtype, device, requires_grad=True, low=-1, high=1)
    weights, biases = _params(sizes, dtype, device)
    inputs = [x, *weights, *biases]
    with on(backend):
        y = PF.fused_mlp(x, weights, biases, activation, output_activation)
        ours, gy = grads(y, inputs)
    y_torch = torch_mlp(x, weights, biases, activation, output_activation)
    theirs, _ = grads(y_torch, inputs, gy)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = torch_mlp(inputs64[0], inputs64[1:4], inputs64[4:], activation, output_activation)
    ref, _ = grads(y64, inputs64, gy.double())
    acts = [activation] * (len(weights) - 1) + [output_activation]
    m_y, layer_m, m_x = product_magnitudes(x, list(zip(weights, biases, acts)), gy)
    magnitudes = [m_x, *(m_w for m_w, _ in layer_m), *(m_b for _, m_b in layer_m)]
    # a hidden relu unit within rounding of its kink may go either way, for ours and torch's alike
    layer_s, s_x = relu_kink_slack(x, list(zip(weights, biases, acts)), gy)
    slacks = [s_x, *(s_w for s_w, _ in layer_s), *(s_b for _, s_b in layer_s)]
    assert_half_close(y, y_torch, y64, m_y)
    for g, g_torch, g64, m, s in zip(ours, theirs, ref, magnitudes, slacks):
        assert_half_close(g, g_torch, g64, m, s)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("activation,output_activation", [("sigmoid", None), ("relu", "sigmoid"), (None, "relu")])
def test_gradcheck(backend, device, activation, output_activation):
    x = make((2, 3, 3), torch.float64, device, requires_grad=True)
    weights, biases = _params([3, 4, 5, 2], torch.float64, device)

    def fn(x, *params):
        return PF.fused_mlp(x, params[:3], params[3:], activation, output_activation)

    with on(backend):
        assert torch.autograd.gradcheck(fn, (x, *weights, *biases))


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("rows", [100, 1000], ids=["blocked", "wide"])
def test_weight_gradients_do_not_depend_on_the_thread_count(backend, device, rows):
    # the blocked loop's promise; a network with enough work for the CPU's layer GEMMs keeps the loop under
    # torch.use_deterministic_algorithms
    x = make((rows, 64), torch.float32, device, requires_grad=True)
    weights, biases = _params([64, 128, 128, 1], torch.float32, device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with on(backend):
                results.append(grads(PF.fused_mlp(x, weights, biases, "relu"), [x, *weights, *biases],
                                     torch.ones(rows, 1, device=device))[0])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_arguments_raise(backend, device):
    x = make((4, 3), torch.float32, device)
    weights, biases = _params([3, 5, 2], torch.float32, device)
    with on(backend):
        with pytest.raises(ValueError, match="at most|1 to 128|Linear"):
            PF.fused_mlp(make((4, 129), torch.float32, device), *_params([129, 2], torch.float32, device))
        with pytest.raises(ValueError, match="activation"):
            PF.fused_mlp(x, weights, biases, activation="tanh")
        with pytest.raises(ValueError, match="output_activation"):
            PF.fused_mlp(x, weights, biases, output_activation="softmax")
        with pytest.raises(ValueError, match="one bias per weight, got 1 biases for 2 weights"):
            PF.fused_mlp(x, weights, biases[:1])
        with pytest.raises(RuntimeError, match="at least 1-D"):
            PF.fused_mlp(torch.tensor(1.0, device=device), weights, biases)
        with pytest.raises(ValueError, match="1 to 16 layers"):
            PF.fused_mlp(x, [], [])
        with pytest.raises(RuntimeError, match="layer 1"):
            PF.fused_mlp(x, [weights[0], weights[0]], biases)
        with pytest.raises(RuntimeError, match="dtype"):
            PF.fused_mlp(x.double(), weights, biases)


@pytest.mark.skipif("cpp" not in pyengine.available_backends(), reason="pyengine._C is not built")
def test_kernel_checks_its_own_contract():
    C = pyengine._backend._C
    x = torch.randn(4, 3)
    weights, biases = _params([3, 2], torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation"):
        C.fused_mlp_forward(x, weights, biases, 3, 0)
    with pytest.raises(ValueError, match="1 to 128"):
        C.fused_mlp_forward(torch.randn(4, 200), *_params([200, 2], torch.float32, "cpu"), 1, 0)
    with pytest.raises(ValueError, match="hidden"):
        C.fused_mlp_backward(torch.randn(4, 2), x, weights, [x], torch.randn(4, 2), 1, 0, True, True, True)
    with pytest.raises(RuntimeError, match="grad_y"):
        C.fused_mlp_backward(torch.randn(5, 2), x, weights, [], torch.randn(4, 2), 1, 0, True, True, True)


def test_module_bad_sizes_raise():
    with pytest.raises(ValueError, match="2 to"):
        pnn.FusedMLP([8])
    with pytest.raises(ValueError, match="Linear"):
        pnn.FusedMLP([8, 200, 1])
    with pytest.raises(ValueError, match="1 to 128"):
        pnn.FusedMLP([8, 0, 1])
    with pytest.raises(ValueError, match="activation"):
        pnn.FusedMLP([8, 4, 1], activation="gelu")


def _torch_twin(sizes, activation, output_activation):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        act = activation if i < len(sizes) - 2 else output_activation
        if act is not None:
            layers.append({"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid}[act]())
    return torch.nn.Sequential(*layers)


def test_module_is_the_torch_composition():
    torch.manual_seed(0)
    ours = pnn.FusedMLP([8, 6, 4, 1], activation="sigmoid", output_activation="sigmoid")
    torch.manual_seed(0)
    theirs = _torch_twin([8, 6, 4, 1], "sigmoid", "sigmoid")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # same initialization: same draws, same order
    x = torch.randn(9, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    unfused = ours.to_sequential()
    assert type(unfused) is torch.nn.Sequential and str(unfused) == str(theirs)
    torch.testing.assert_close(unfused(x), theirs(x), rtol=0, atol=0)
    assert "sigmoid" in repr(ours) and "[8, 6, 4, 1]" in repr(ours)
    assert pnn.FusedMLP([3, 2], dtype=torch.float64).state_dict()["0.weight"].dtype == torch.float64
    # no activation between layers: the Linear layers are the Sequential's 0, 1, 2
    assert list(pnn.FusedMLP([3, 4, 5, 2], activation=None).state_dict()) == [
        f"{i}.{name}" for i in range(3) for name in ("weight", "bias")]


def test_module_parameters_are_one_packed_tensor():
    """params: per layer the weight row by row, then the bias; weights and biases are live views of it."""
    torch.manual_seed(1)
    ours = pnn.FusedMLP([8, 6, 4, 1], activation="relu")
    (name, params), = ours.named_parameters()
    assert name == "params" and params.shape == (6 * 9 + 4 * 7 + 1 * 5,)
    theirs = _torch_twin([8, 6, 4, 1], "relu", None)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(params.detach(), torch.cat([p.detach().reshape(-1) for p in theirs.parameters()]))
    assert [tuple(w.shape) for w in ours.weights] == [(6, 8), (4, 6), (1, 4)]
    assert [tuple(b.shape) for b in ours.biases] == [(6,), (4,), (1,)]
    with torch.no_grad():
        params[0] = 5.0
    assert ours.weights[0][0, 0] == 5.0 and ours.state_dict()["0.weight"][0, 0] == 5.0
    assert ours.state_dict()["0.weight"].data_ptr() == params.data_ptr()  # views, as torch's state_dict holds
    # gradients land in params.grad, laid out like params
    x = torch.randn(30, 8)
    ours(x).sum().backward()
    theirs.load_state_dict(ours.state_dict())
    theirs(x).sum().backward()
    torch.testing.assert_close(params.grad, torch.cat([p.grad.reshape(-1) for p in theirs.parameters()]))
    # moved and cast as one tensor, still unpacked correctly
    double = pnn.FusedMLP([8, 6, 4, 1]).double()
    assert double.params.dtype == torch.float64 and double.weights[2].dtype == torch.float64


def test_module_state_dict_errors_are_torch_s():
    ours = pnn.FusedMLP([8, 6, 1])
    theirs = _torch_twin([8, 6, 1], "relu", None)
    state = theirs.state_dict()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "2.bias"'):
        ours.load_state_dict({k: v for k, v in state.items() if k != "2.bias"})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "3.weight"'):
        ours.load_state_dict({**state, "3.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        ours.load_state_dict({**state, "0.weight": torch.zeros(6, 7)})
    fresh = pnn.FusedMLP([8, 6, 1])
    result = fresh.load_state_dict({k: v for k, v in state.items() if k != "2.bias"}, strict=False)
    assert result.missing_keys == ["2.bias"] and torch.equal(fresh.weights[1], state["2.weight"])
    # inside a bigger model the keys carry its prefix
    outer = torch.nn.Sequential(torch.nn.Identity(), pnn.FusedMLP([8, 6, 1]))
    outer.load_state_dict({f"1.{k}": v for k, v in state.items()})
    torch.testing.assert_close(outer[1].weights[0], state["0.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_module_matches_torch_and_sgd_reduces_the_loss(backend, device):
    ours = pnn.FusedMLP([8, 6, 4, 1], activation="sigmoid").to(device, torch.float64)
    theirs = _torch_twin([8, 6, 4, 1], "sigmoid", None).to(device, torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(759, 8, dtype=torch.float64, device=device)
    y = (x[:, :1] + x[:, 1:2] > 0).to(torch.float64)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (ours, theirs)]
    losses = []
    for _ in range(40):
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            with on(backend):
                loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            if model is ours:
                losses.append(loss.item())
    assert losses[-1] < losses[0]
    for key, value in theirs.state_dict().items():  # one packed tensor against six: elementwise, the same steps
        assert_close(ours.state_dict()[key], value)


TRAINING_LOSSES = {"mse": torch.nn.MSELoss(), "bce_with_logits": torch.nn.BCEWithLogitsLoss(),
                   "cross_entropy": torch.nn.CrossEntropyLoss()}


def _training_data(loss, batch, sizes, dtype, device):
    x = make((*batch, sizes[0]), dtype, device)
    if loss == "cross_entropy":
        target = torch.randint(0, sizes[-1], batch, device=device)
        target.view(-1)[::7] = -100  # ignored rows, as torch's default ignore_index
        return x, target
    target = make((*batch, sizes[-1]), dtype, device)
    return x, (target > 0).to(dtype) if loss == "bce_with_logits" else target


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("loss", TRAINING_LOSSES)
@pytest.mark.parametrize("sizes,batch,activation,output_activation", [
    ([8, 6, 4, 1], (759,), "sigmoid", None), ([5, 17, 3], (2, 33), "relu", "sigmoid"), ([3, 9, 4], (1,), None, None)],
    ids=str)
def test_training_step_is_zero_grad_backward_and_sgd(backend, device, dtype, loss, sizes, batch, activation,
                                                    output_activation):
    """Five training steps against torch's: the same losses, parameters and last gradient."""
    ours = pnn.FusedMLP(sizes, activation, output_activation, device=device, dtype=dtype)
    theirs = ours.to_sequential()
    opt = torch.optim.SGD(theirs.parameters(), lr=0.05)  # small enough that no case diverges (which would
    # magnify rounding differences past any tolerance)
    x, target = _training_data(loss, batch, sizes, dtype, device)
    for _ in range(5):
        with on(backend):
            value = ours.training_step(x, target, lr=0.05, loss=loss)
        opt.zero_grad()
        out = theirs(x)
        expected = (TRAINING_LOSSES[loss](out.reshape(-1, sizes[-1]), target.reshape(-1)) if loss == "cross_entropy"
                    else TRAINING_LOSSES[loss](out, target))
        expected.backward()
        opt.step()
        assert value.shape == () and value.grad_fn is None and not value.requires_grad
        loss_scale, grad_magnitude = _step_scales(theirs, x, target, loss)
        assert_close(value, expected.detach(), scale=loss_scale)
    for key, param in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], param)
    assert_close(ours.params.grad, torch.cat([p.grad.reshape(-1) for p in theirs.parameters()]),
                 scale=magnitude(grad_magnitude))
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_training_step_bad_arguments_raise(backend, device):
    ours = pnn.FusedMLP([4, 5, 3], device=device)
    x = make((6, 4), torch.float32, device)
    before = ours.params.detach().clone()
    with on(backend):
        with pytest.raises(ValueError, match="loss must be one of"):
            ours.training_step(x, make((6, 3), torch.float32, device), lr=0.1, loss="hinge")
        with pytest.raises(ValueError, match="Invalid learning rate"):
            ours.training_step(x, make((6, 3), torch.float32, device), lr=-1.0)
        with pytest.raises(ValueError, match=r"shaped like the output, \(6, 3\)"):
            ours.training_step(x, make((6, 1), torch.float32, device), lr=0.1, loss="mse")
        with pytest.raises(ValueError, match="dtype"):
            ours.training_step(x, make((6, 3), torch.float64, device), lr=0.1)
        with pytest.raises(ValueError, match=r"one int64 class index per row, a target of shape \(6,\)"):
            ours.training_step(x, make((6, 3), torch.float32, device), lr=0.1, loss="cross_entropy")
        with pytest.raises(RuntimeError, match="at least 1-D"):
            ours.training_step(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device), lr=0.1)
        with pytest.raises(IndexError, match="out of bounds"):
            ours.training_step(x, torch.full((6,), 3, device=device), lr=0.1, loss="cross_entropy")
    assert torch.equal(ours.params.detach(), before)  # nothing was updated by a failed step


def _torch_step_gradient(model, x, target, loss):
    out = model(x)
    lf = TRAINING_LOSSES[loss]
    value = lf(out.reshape(-1, out.shape[-1]), target.reshape(-1)) if loss == "cross_entropy" else lf(out, target)
    value.backward()
    return value.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("loss", TRAINING_LOSSES)
def test_training_step_edge_cases(backend, device, loss):
    """A transposed (non-contiguous) input, an empty batch (NaN mean loss and zero gradients, as torch), and
    bfloat16 (error against float64 within twice torch's own)."""
    ours = pnn.FusedMLP([4, 5, 3], device=device)
    transposed = make((4, 9), torch.float32, device).t()
    for x in (transposed, make((0, 4), torch.float32, device)):
        target = (torch.randint(0, 3, x.shape[:1], device=device) if loss == "cross_entropy"
                  else make((x.shape[0], 3), torch.float32, device, low=0, high=1))
        theirs = ours.to_sequential()
        with on(backend):
            value = ours.training_step(x, target, 0.0, loss=loss)
        expected, grad = _torch_step_gradient(theirs, x, target, loss)
        assert_close(value, expected)
        assert_close(ours.params.grad, grad)
    if loss == "cross_entropy":  # an ignored row of NaN outputs: its gradient is NaN * 0, as torch's
        x = make((20, 4), torch.float32, device)
        x[3, 1] = float("nan")
        target = torch.randint(0, 3, (20,), device=device)
        target[3] = -100
        with on(backend):
            ours.training_step(x, target, 0.0, loss=loss)
        _, grad = _torch_step_gradient(ours.to_sequential(), x, target, loss)
        assert grad.isnan().any()
        assert_close(ours.params.grad, grad)
    half = pnn.FusedMLP([4, 5, 3], device=device, dtype=torch.bfloat16)
    x = make((33, 4), torch.bfloat16, device)
    target = (torch.randint(0, 3, (33,), device=device) if loss == "cross_entropy"
              else make((33, 3), torch.bfloat16, device, low=0, high=1))
    with on(backend):
        half.training_step(x, target, 0.0, loss=loss)
    _, torch_grad = _torch_step_gradient(half.to_sequential(), x, target, loss)
    exact = half.to_sequential().double()
    _, grad64 = _torch_step_gradient(exact, x.double(), target if loss == "cross_entropy" else target.double(), loss)
    magnitude = _step_gradient_magnitudes(exact, x, target, loss)
    assert_half_close(half.params.grad, torch_grad, grad64, magnitude)


def _step_scales(model, x, target, loss):
    """assert_close's scales for a training step of `model` (evaluated in float64 at its current parameters): the
    loss moves by about sum |dloss/dy| m_y when the outputs y move by their magnitudes m_y (a fitted output, with
    y - t far below y, makes the loss tiny and its rounding relatively large), and the gradient's magnitudes."""
    model64 = copy.deepcopy(model).double()
    outputs = _outputs(model64, x)
    y = outputs[1].clone().requires_grad_()
    (dy,) = torch.autograd.grad(TRAINING_LOSSES[loss](*_loss_args(y, target, loss)), y)
    return (dy.abs() * outputs[2]).sum().item(), _step_gradient_magnitudes(model64, x, target, loss, outputs)


def _layers(model64):
    """The Sequential's Linear layers as product_magnitudes takes them: (weight, bias, the activation after it)."""
    names = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid"}
    mods = list(model64)
    return [(m.weight, m.bias, names.get(type(mods[i + 1])) if i + 1 < len(mods) else None)
            for i, m in enumerate(mods) if isinstance(m, torch.nn.Linear)]


def _outputs(model64, x):
    """x as float64 rows, the model's outputs y on them, and the outputs' magnitudes m_y."""
    x64 = x.double().reshape(-1, x.shape[-1])
    y = model64(x64).detach()
    m_y, _, _ = product_magnitudes(x64, _layers(model64), torch.zeros_like(y))
    return x64, y, m_y


def _loss_args(out, target, loss):
    if loss == "cross_entropy":
        return out, target.reshape(-1)
    return out, target.double().reshape(out.shape)


def _step_gradient_magnitudes(model64, x, target, loss, outputs=None):
    """The magnitudes (see utils.product_magnitudes) of a training step's parameter gradient, packed as
    model.parameters(): the loss gradient's terms (and the error the output's own magnitude carries into them)
    pushed back through the layers. outputs: what _outputs(model64, x) gives, where the caller has it."""
    x64, y, m_y = outputs or _outputs(model64, x)
    t = _loss_args(y, target, loss)[1]
    if loss == "mse":
        m_g = 2 * (y.abs() + t.abs() + m_y) / y.numel()
    elif loss == "bce_with_logits":
        s = torch.sigmoid(y)
        m_g = (s + t + s * (1 - s) * m_y) / y.numel()
    else:
        p = torch.softmax(y, -1)
        onehot = F.one_hot(t.clamp_min(0), y.shape[-1]).double()
        m_g = (p + onehot + p * m_y) / max(int((t != -100).sum()), 1)
    _, layer_m, _ = product_magnitudes(x64, _layers(model64), m_g)
    return torch.cat([t.reshape(-1) for m_w, m_b in layer_m for t in (m_w, m_b)])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_backward_makes_no_zeros_for_the_hidden_activations(backend, device):
    # the hidden activations are outputs of the op's node, not differentiable: their gradients are not
    # materialized as zeros (one activation-sized block per layer at every backward)
    x = make((50, 6), torch.float32, device, requires_grad=True)
    weights, biases = _params([6, 9, 7, 2], torch.float32, device)
    with on(backend):
        y = PF.fused_mlp(x, weights, biases, "relu", "sigmoid")
    calls = backward_aten_calls(y.sum())
    assert not [c for c in calls if c[0].startswith("zeros")], calls

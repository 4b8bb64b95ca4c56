"""TorchScript: torch.jit.trace and torch.jit.script of models with pyengine.nn modules give eager's values and
torch's gradients, record pyengine's registered operators, and save and load; scripting without the compiled
extension refuses with a message that says what to use instead."""
import copy
import io

import pytest
import torch

import pyengine
import pyengine.nn as pnn
from utils import COMPILED_DEVICES, assert_close, on

pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")]


def _torch_model(device):
    return torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.ReLU(), torch.nn.Linear(7, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 5), torch.nn.Sigmoid(), torch.nn.Linear(5, 4),
                               torch.nn.LeakyReLU(0.2)).to(device, torch.float64)


def _round_trip(module):
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _check_values_and_grads(jitted, torch_model, device):
    """jitted (and its saved-and-loaded copy) against torch_model on inputs it has not seen, gradients included."""
    for module in (jitted, _round_trip(jitted)):
        x = torch.randn(2, 9, 3, dtype=torch.float64, device=device)
        assert_close(module(x), torch_model(x))
        torch_model.zero_grad()
        torch_model(x).square().sum().backward()
        grads = torch.autograd.grad(module(x).square().sum(), list(module.parameters()))
        for got, param in zip(grads, torch_model.parameters()):
            assert_close(got, param.grad)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_trace_records_pyengine_operators(backend, device):
    torch_model = _torch_model(device)
    model = pnn.convert(copy.deepcopy(torch_model))
    with on(backend):
        # a trace keeps the rank of its example (as any trace of Python code that branches on it), not its sizes
        traced = torch.jit.trace(model, torch.randn(3, 4, 3, dtype=torch.float64, device=device), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert {"pyengine::linear_forward", "pyengine::relu_forward", "pyengine::tanh_forward", "pyengine::sigmoid_forward",
            "pyengine::leaky_relu_forward"} <= kinds
    _check_values_and_grads(traced, torch_model, device)


def test_trace_of_the_issue_example_is_not_garbage():
    m = pnn.convert(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
    traced = torch.jit.trace(m, torch.randn(4, 3), check_trace=False)
    x = torch.randn(4, 3)
    assert_close(traced(x), m(x))


def test_trace_on_the_python_backend_gives_eager_values():
    torch_model = _torch_model("cpu")
    model = pnn.convert(copy.deepcopy(torch_model))
    with on("python"):
        traced = torch.jit.trace(model, torch.randn(4, 3, dtype=torch.float64), check_trace=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(traced(x), torch_model(x))


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
def test_trace_of_losses(loss, backend, device):
    x = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    target = {"cross_entropy": torch.randint(0, 4, (6,), device=device),
              "mse": torch.randn(6, 4, dtype=torch.float64, device=device),
              "bce": torch.rand(6, 4, dtype=torch.float64, device=device)}[loss]
    ours, theirs = {"cross_entropy": (pnn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()),
                    "mse": (pnn.MSELoss(), torch.nn.MSELoss()),
                    "bce": (pnn.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss())}[loss]
    with on(backend):
        traced = torch.jit.trace(ours, (x, target), check_trace=False)
    assert any(node.kind().startswith("pyengine::") for node in traced.inlined_graph.nodes())
    (got,) = torch.autograd.grad(traced(x, target), x)
    (want,) = torch.autograd.grad(theirs(x, target), x)
    assert_close(traced(x, target), theirs(x, target))
    assert_close(got, want)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_script_of_a_converted_model(backend, device):
    torch_model = _torch_model(device)
    scripted = torch.jit.script(pnn.convert(copy.deepcopy(torch_model)))
    assert "pyengine::linear_forward" in {node.kind() for node in scripted.inlined_graph.nodes()}
    _check_values_and_grads(scripted, torch_model, device)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_script_of_losses_and_fused_mlp(backend, device):
    x = torch.randn(5, 4, 3, dtype=torch.float64, device=device)
    index_target = torch.randint(0, 4, (5, 3), device=device)
    index_target[0, 0] = -100
    cases = [
        (pnn.CrossEntropyLoss(label_smoothing=0.1), torch.nn.CrossEntropyLoss(label_smoothing=0.1), index_target),
        (pnn.CrossEntropyLoss(reduction="none"), torch.nn.CrossEntropyLoss(reduction="none"), index_target),
        (pnn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), x.softmax(1)),
        (pnn.MSELoss(reduction="sum"), torch.nn.MSELoss(reduction="sum"), torch.randn_like(x)),
        (pnn.BCEWithLogitsLoss(pos_weight=torch.rand(3, dtype=torch.float64, device=device)),
         torch.nn.BCEWithLogitsLoss(), torch.rand_like(x)),
    ]
    for ours, theirs, target in cases:
        theirs.pos_weight = getattr(ours, "pos_weight", None)
        assert_close(torch.jit.script(ours)(x, target), theirs(x, target))
    mlp = pnn.FusedMLP([3, 8, 2], activation="sigmoid").to(device, torch.float64)
    assert_close(torch.jit.script(mlp)(x), mlp.to_sequential()(x))


def test_script_without_the_extension_says_what_to_use(monkeypatch):
    monkeypatch.setattr(pyengine._backend, "_C", None)
    with pytest.raises(RuntimeError, match="torch.jit.script of pyengine.nn.Linear needs pyengine's compiled "
                                           "extension.*torch.compile, or torch.jit.trace"):
        torch.jit.script(pnn.convert(torch.nn.Sequential(torch.nn.Linear(3, 2))))

"""pyengine.nn: torch.nn's modules with pyengine's forward; weights interchange both ways; convert()."""
import pytest
import torch

import pyengine
import pyengine.nn as pnn
from utils import BACKEND_DEVICES, assert_close, on


def test_modules_keep_torch_constructor_init_and_state_dict():
    torch.manual_seed(0)
    ours = pnn.Linear(8, 6)
    torch.manual_seed(0)
    theirs = torch.nn.Linear(8, 6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k in ours.state_dict():
        assert torch.equal(ours.state_dict()[k], theirs.state_dict()[k])  # same initialization
    assert pnn.Linear(3, 2, bias=False).bias is None
    assert pnn.Linear(3, 2, dtype=torch.float64).weight.dtype == torch.float64
    loss = pnn.CrossEntropyLoss(weight=torch.ones(3), ignore_index=1, label_smoothing=0.2, reduction="sum")
    assert loss.state_dict().keys() == torch.nn.CrossEntropyLoss(weight=torch.ones(3)).state_dict().keys()


def _mlp(lib):
    """The origin notes' 8 -> 6 -> 4 -> 1 network with sigmoid activations."""
    return torch.nn.Sequential(lib.Linear(8, 6), lib.Sigmoid(), lib.Linear(6, 4), lib.Sigmoid(), lib.Linear(4, 1),
                               lib.Sigmoid())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mini_batch_training_matches_torch(backend, device):
    """Mini-batch gradient descent, w <- w - lr * grad, on pyengine and on torch from the same weights."""
    ours = _mlp(pnn).to(device, torch.float64)
    theirs = _mlp(torch.nn).to(device, torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(759, 8, dtype=torch.float64, device=device)
    y = (x[:, :1] + x[:, 1:2] > 0).to(torch.float64)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.5)
    for _epoch in range(3):
        for idx in torch.randperm(759, device=device).split(128):
            for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
                opt.zero_grad()
                with on(backend):
                    loss = ((model(x[idx]) - y[idx]) ** 2).mean()
                loss.backward()
                opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p, q)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_classifier_loss_and_grads_match_torch(backend, device):
    ours = torch.nn.Sequential(pnn.Linear(20, 32), pnn.ReLU(), pnn.Linear(32, 10)).to(device)
    theirs = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(device)
    theirs.load_state_dict(ours.state_dict())
    x, t = torch.randn(64, 20, device=device), torch.randint(0, 10, (64,), device=device)
    t[::7] = -100
    with on(backend):
        loss = pnn.CrossEntropyLoss(label_smoothing=0.1)(ours(x), t)
    loss.backward()
    loss_ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(theirs(x), t)
    loss_ref.backward()
    assert_close(loss, loss_ref)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad)


def test_convert_swaps_layers_in_place_and_keeps_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(inplace=True),
                                torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Sigmoid()))
    params_before = [id(p) for p in model.parameters()]
    x = torch.randn(5, 4)
    expected = model(x)
    assert pnn.convert(model) is model
    kinds = [type(m) for m in model.modules()]
    assert pnn.Linear in kinds and pnn.ReLU in kinds and pnn.Sigmoid in kinds
    assert torch.nn.Linear not in kinds
    assert [id(p) for p in model.parameters()] == params_before  # an optimizer built before keeps working
    assert_close(model(x), expected)
    assert isinstance(pnn.convert(torch.nn.CrossEntropyLoss()), pnn.CrossEntropyLoss)


def test_convert_leaves_subclasses_alone():
    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = pnn.convert(torch.nn.Sequential(MyLinear(2, 2)))
    assert type(m[0]) is MyLinear


def test_state_dict_loads_both_ways():
    theirs = torch.nn.Linear(5, 3)
    ours = pnn.Linear(5, 3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5)
    assert_close(ours(x), theirs(x))
    theirs.load_state_dict(pnn.Linear(5, 3).state_dict())
    # torch's Linear is the only base with state (the other, pnn._Scriptable, only prepares torch.jit.script)
    assert [c for c in pyengine.nn.Linear.__mro__[1:] if '__init__' in vars(c)][0] is torch.nn.Linear

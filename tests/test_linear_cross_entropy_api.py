"""linear_cross_entropy with torch 2.14's API: pyengine.functional.linear_cross_entropy against
torch.nn.functional.linear_cross_entropy for every argument torch's takes (linear_bias, class weights, reductions,
ignore_index None and an int, label_smoothing, out_features' K dims, class probabilities, options), its errors,
and pyengine.nn.LinearCrossEntropyLoss against torch.nn.LinearCrossEntropyLoss (state_dict, convert()).
The tests against torch's functional and module skip where torch lacks them (before 2.14); pyengine's own
functional is checked there too, against torch's linear + cross_entropy."""
import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import pyengine.functional as PF
import pyengine.nn as pnn
from utils import BACKEND_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close, assert_raises_like, on

lce_module = importlib.import_module("pyengine.ops.linear_cross_entropy")
HAS_TORCH_FUNCTIONAL = hasattr(F, "linear_cross_entropy")
HAS_TORCH_MODULE = hasattr(torch.nn, "LinearCrossEntropyLoss")
needs_torch_functional = pytest.mark.skipif(
    not HAS_TORCH_FUNCTIONAL, reason="torch.nn.functional.linear_cross_entropy is new in torch 2.14; this torch "
    f"({torch.__version__}) has none to compare with")
needs_torch_module = pytest.mark.skipif(
    not HAS_TORCH_MODULE, reason="torch.nn.LinearCrossEntropyLoss is new in torch 2.14; this torch "
    f"({torch.__version__}) has none (nor has pyengine.nn)")

H, C = 5, 7
REDUCTIONS = ["mean", "sum", "none"]
# (input's leading dims, out_features): a batch, a 1-D input, torch's K-dimensional loss (K = 1 and 2)
LAYOUTS = [((9,), ()), ((), ()), ((6,), (2,)), ((4,), (2, 3))]
CHUNK = 2 * C * 8  # two float64 rows (four float32 ones) per chunk: several chunks and a ragged last one


def _params(lead, out, dtype, device, bias, class_weights):
    x = torch.randn(*lead, H, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(C, *out, H, dtype=dtype, device=device) * 0.5).requires_grad_()
    b = torch.randn(C, *out, dtype=dtype, device=device, requires_grad=True) if bias else None
    cw = torch.rand(C, dtype=dtype, device=device) + 0.1 if class_weights else None
    return x, w, b, cw


def _targets(shape, device, ignore_index):
    """Class indices; every third one ignored (ignore_index, or torch's default -100 for None)."""
    t = torch.randint(0, C, shape, device=device)
    if t.numel() > 1:
        t.view(-1)[::3] = -100 if ignore_index is None else ignore_index
    return t


def _compare(backend, ours_fn, theirs_fn, inputs, scale=None):
    """Loss and the gradients of every input that requires grad (one random incoming gradient for both)."""
    with on(backend):
        ours = ours_fn()
    theirs = theirs_fn()
    assert_close(ours, theirs)
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    g = torch.randn_like(theirs)
    got = torch.autograd.grad(ours, wrt, g, allow_unused=True)
    want = torch.autograd.grad(theirs, wrt, g, allow_unused=True)
    for a, r in zip(got, want):
        assert (a is None) == (r is None)
        if a is not None:
            assert_close(a, r, scale=scale)


@needs_torch_functional
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("bias,class_weights", [(False, False), (False, True), (True, True)],
                         ids=["plain", "cw", "bias-cw"])  # bias alone: test_linear_cross_entropy.py
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [None, 3], ids=["ignore-None", "ignore-3"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch_functional(backend, device, dtype, layout, bias, class_weights, reduction, ignore_index,
                                  smoothing):
    lead, out = layout
    x, w, b, cw = _params(lead, out, dtype, device, bias, class_weights)
    t = _targets((*lead, *out), device, ignore_index)
    kw = dict(linear_bias=b, weight=cw, reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
    _compare(backend, lambda: PF.linear_cross_entropy(x, w, t, chunk_bytes=CHUNK, **kw),
             lambda: F.linear_cross_entropy(x, w, t, **kw), [x, w, b])


@needs_torch_functional
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("class_weights", [False, True], ids=["nocw", "cw"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_probabilities_match_torch(backend, device, dtype, layout, class_weights, reduction, smoothing):
    """A target of the logits' shape holds probabilities: gradients for the target and, as torch's, for a class
    weight that requires grad."""
    lead, out = layout
    x, w, b, cw = _params(lead, out, dtype, device, True, class_weights)
    if cw is not None:
        cw.requires_grad_()
    p = torch.rand(*lead, C, *out, dtype=dtype, device=device).softmax(len(lead)).requires_grad_()
    kw = dict(linear_bias=b, weight=cw, reduction=reduction, label_smoothing=smoothing)
    _compare(backend, lambda: PF.linear_cross_entropy(x, w, p, **kw), lambda: F.linear_cross_entropy(x, w, p, **kw),
             [x, w, b, cw, p])


@needs_torch_functional
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("out", [(), (2,)], ids=["2d", "kdim"])
@pytest.mark.parametrize("class_weights", [False, True], ids=["nocw", "cw"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_batch_dims_are_torch_on_the_flattened_rows(backend, device, dtype, out, class_weights, reduction):
    """pyengine takes input (*, H) where torch takes (N, H) or (H): torch's result for the rows flattened."""
    x, w, b, cw = _params((2, 3), out, dtype, device, True, class_weights)
    t = _targets((2, 3, *out), device, None)
    kw = dict(linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.2)

    def theirs():
        loss = F.linear_cross_entropy(x.reshape(6, H), w, t.reshape(6, *out), **kw)
        return loss.reshape(2, 3, *out) if reduction == "none" else loss

    _compare(backend, lambda: PF.linear_cross_entropy(x, w, t, chunk_bytes=CHUNK, **kw), theirs, [x, w, b])


@needs_torch_functional
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("class_weights", ["none", "some", "zero"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_no_row_counted_gives_torchs_nan(backend, device, class_weights, smoothing):
    """'mean' with every row ignored is NaN with zero gradients; with class weights that are all 0 it is NaN with
    NaN gradients: torch's 0 / 0 either way."""
    x, w, b, cw = _params((6,), (), torch.float64, device, True, class_weights != "none")
    if class_weights == "zero":
        cw = torch.zeros_like(cw)
        t = torch.randint(0, C, (6,), device=device)
    else:
        t = torch.full((6,), -100, device=device)
    kw = dict(linear_bias=b, weight=cw, label_smoothing=smoothing)
    _compare(backend, lambda: PF.linear_cross_entropy(x, w, t, **kw), lambda: F.linear_cross_entropy(x, w, t, **kw),
             [x, w, b])


@needs_torch_functional
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", ["cw", "cw-smoothing", "kdim"])
def test_half_precision_error_within_twice_torch(backend, device, dtype, case):
    out = (2,) if case == "kdim" else ()
    x, w, b, cw = _params((37,), out, dtype, device, True, case != "kdim")
    t = _targets((37, *out), device, None)
    kw = dict(weight=cw, reduction="sum", label_smoothing=0.1 if case == "cw-smoothing" else 0.0)
    inputs = [x, w, b]
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    ref = F.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    p64 = [p.detach().double().requires_grad_() for p in inputs]
    ref64 = F.linear_cross_entropy(p64[0], p64[1], t, linear_bias=p64[2],
                                   **{**kw, "weight": None if cw is None else cw.double()})
    assert_half_close(loss, ref, ref64)
    g = torch.randn_like(ref)
    for a, r, e in zip(torch.autograd.grad(loss, inputs, g), torch.autograd.grad(ref, inputs, g),
                       torch.autograd.grad(ref64, p64, g.double())):
        assert_half_close(a, r, e)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_weights_gradcheck(backend, device, smoothing, reduction):
    x, w, b, cw = _params((7,), (), torch.float64, device, True, True)
    t = _targets((7,), device, None)
    with on(backend):
        assert torch.autograd.gradcheck(
            lambda *p: PF.linear_cross_entropy(p[0], p[1], t, linear_bias=p[2], weight=cw, reduction=reduction,
                                               label_smoothing=smoothing, chunk_bytes=CHUNK), (x, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_works_without_torchs_functional(backend, device, reduction, monkeypatch):
    """pyengine's functional is its own: on a torch without F.linear_cross_entropy (before 2.14) it gives torch's
    linear + cross_entropy, class weights and all."""
    monkeypatch.delattr(F, "linear_cross_entropy", raising=False)
    x, w, b, cw = _params((8,), (), torch.float64, device, True, True)
    t = _targets((8,), device, None)

    def theirs():
        return F.cross_entropy(F.linear(x, w, b), t, weight=cw, reduction=reduction, label_smoothing=0.1)

    _compare(backend, lambda: PF.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=reduction,
                                                      label_smoothing=0.1), theirs, [x, w, b])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_options_batch_chunk_size_sets_the_chunk(backend, device, monkeypatch):
    """options.batch_chunk_size is the rows per chunk (where chunk_bytes is not given); chunk_bytes wins."""
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_cls is None:
        pytest.skip(f"torch.nn.LinearCrossEntropyOptions is new in torch 2.14 (this is {torch.__version__})")
    seen = []
    real = lce_module._chunk_bytes
    monkeypatch.setattr(lce_module, "_chunk_bytes", lambda chunk: seen.append(chunk) or real(chunk))
    x, w, b, _ = _params((9,), (), torch.float32, device, True, False)
    t = _targets((9,), device, None)

    def chunk_bytes_passed(**kw):
        seen.clear()
        with on(backend):
            loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
        assert len(set(seen)) == 1
        return loss, seen[0]

    plain, budget = chunk_bytes_passed()
    assert budget is None  # the environment variable's, or the default
    chunked, budget = chunk_bytes_passed(options=options_cls(batch_chunk_size=2))
    assert budget == 2 * C * 4  # two float32 rows of C logits
    assert_close(chunked, plain)
    assert chunk_bytes_passed(options=options_cls(batch_chunk_size=2), chunk_bytes=100)[1] == 100
    assert chunk_bytes_passed(options=options_cls())[1] is None


@needs_torch_functional
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_input_raises_like_torch(backend, device):
    x, w, b, cw = _params((4,), (), torch.float32, device, True, True)
    t = torch.tensor([0, 1, 2, 4], device=device)
    wk = w.detach().reshape(C, 1, H).expand(C, 2, H).contiguous()  # K = 1: targets (4, 2)
    out_of_range = [] if device == "cuda" else [  # CUDA: a device-side assert, as torch's
        (x, w, torch.tensor([0, 1, C, 1], device=device), {}, "Target 7 is out of bounds"),
        (x, w, torch.tensor([0, 1, C, 1], device=device), dict(weight=cw), "Target 7 is out of bounds"),
        (x, w, torch.tensor([0, -1, 2, 3], device=device), dict(weight=cw, reduction="none"),
         "Target -1 is out of bounds"),
    ]
    cases = out_of_range + [  # (input, linear_weight, target, kwargs, torch's key phrase)
        (x[0, 0], w, t[0], {}, "expected input with dimensionality 1 or 2, got 0"),
        (x, w[0], t, {}, "expected linear_weight with dimensionality at least 2, got 1"),
        (x, w[:, :3], t, {}, r"expected equal input and linear_weight last dimensions \(in_features\), got 5 and 3"),
        (x, w, t, dict(linear_bias=b[:4]), r"expected linear_bias shape \(7,\), got \(4,\)"),
        (x, w, t, dict(linear_bias=b[:1]), r"expected linear_bias shape \(7,\), got \(1,\)"),  # no broadcasting
        (x[0], wk, t[0], {}, "K-dimensional loss defined by linear_weight shape .* requires batched input"),
        (x, w, torch.rand(4, C, device=device), dict(ignore_index=-100),
         "ignore_index cannot be specified when target contains probabilities"),
        (x, w, t, dict(reduction="avg"), "avg is not a valid value for reduction"),
        (x, w, t, dict(label_smoothing=1.5), "label_smoothing must be between 0.0 and 1.0"),
        (x, w, t[:3], {}, r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
        (x, w, t[0], {}, r"Expected input batch_size \(4\) to match target batch_size \(0\)"),
        (x, w, t.reshape(4, 1).expand(4, 2), {}, "0D or 1D target tensor expected, multi-target not supported"),
        (x[0], w, t, {}, "For 1D input, 1D target must have size 1, but got target size: 4"),
        (x, wk, t, {}, r"Expected target size \[4, 2\], got \[4\]"),
        (x, w, t.int(), {}, "expected target dtype to be Long or Byte, but got Int"),
        (x, w, t.float(), {}, "expected target dtype to be Long or Byte, but got Float"),
        (x, w, torch.zeros(4, C, dtype=torch.long, device=device), {},
         "Expected floating point type for target with class probabilities, got Long"),
        (x, w.double(), t, {}, "have the same dtype"),
        (x, w, t, dict(linear_bias=b.double()), "have the same dtype"),
        (x, w, t, dict(weight=cw[:5]), "weight tensor should be defined either for all 7 classes or no classes"),
        (x, w, t, dict(weight=cw.reshape(C, 1)), "weight tensor should be defined either for all 7 classes"),
        (x, wk, t.reshape(4, 1).expand(4, 2), dict(weight=cw[:5]),
         "weight tensor should be defined either for all or no classes"),
        (x, w, t, dict(weight=cw.double()), "expected scalar type Float but found Double"),
        (x, w, t, dict(weight=cw.detach().clone().requires_grad_()),
         "is not differentiable with respect to argument 'weight'"),
        (x.detach().long(), w.detach().long(), t, {}, "not implemented for 'Long'"),
        (x.detach().long(), w.detach().long(), t, dict(weight=cw.long()), "not implemented for 'Long'"),
    ]
    for xi, wi, ti, kw, phrase in cases:
        def ours(xi=xi, wi=wi, ti=ti, kw=kw):
            with on(backend):
                PF.linear_cross_entropy(xi, wi, ti, **kw).sum().backward()

        def theirs(xi=xi, wi=wi, ti=ti, kw=kw):
            F.linear_cross_entropy(xi, wi, ti, **kw).sum().backward()

        assert_raises_like(theirs, ours, phrase)


# pyengine.nn.LinearCrossEntropyLoss

MODULE_CONFIGS = [dict(), dict(bias=True), dict(bias=True, out_features=(2, 3)),
                  dict(bias=True, reduction="none", ignore_index=1, label_smoothing=0.1, weight=True),
                  dict(reduction="sum", weight=True, out_features=(2,)), dict(bias=True, options=True)]


def _module_kwargs(config, dtype, device):
    kw = dict(config, dtype=dtype, device=device)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, dtype=dtype, device=device) + 0.1
    if kw.pop("options", False):  # torch's chunked path; pyengine's chunk of 3 rows
        kw["options"] = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    return kw


@needs_torch_module
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=str)
def test_module_has_torchs_parameters_and_state_dict(config):
    kw = _module_kwargs(config, torch.float32, "cpu")
    torch.manual_seed(0)
    ours = pnn.LinearCrossEntropyLoss(H, C, **kw)
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(H, C, **kw)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)  # same initialization
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert repr(ours) == repr(theirs)
    assert "LinearCrossEntropyLoss" in pnn.__all__


@needs_torch_module
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=str)
def test_module_matches_torch_and_loads_both_ways(backend, device, dtype, config):
    kw = _module_kwargs(config, dtype, device)
    ours = pnn.LinearCrossEntropyLoss(H, C, **kw)
    theirs = torch.nn.LinearCrossEntropyLoss(H, C, **kw)
    theirs.load_state_dict(ours.state_dict())  # pyengine -> torch
    ours.load_state_dict(torch.nn.LinearCrossEntropyLoss(H, C, **kw).state_dict())  # torch -> pyengine
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, H, dtype=dtype, device=device, requires_grad=True)
    t = _targets((8, *config.get("out_features", ())), device, config.get("ignore_index"))
    _compare(backend, lambda: ours(x, t), lambda: theirs(x, t), [x])
    with on(backend):
        loss = ours(x, t).sum()
    loss.backward()
    theirs(x, t).sum().backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad)


@needs_torch_module
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_convert_swaps_the_module_and_gives_torchs_values(backend, device):
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(H, H, dtype=torch.float64)
            self.loss = torch.nn.LinearCrossEntropyLoss(H, C, bias=True, weight=torch.rand(C, dtype=torch.float64),
                                                        label_smoothing=0.1, dtype=torch.float64)

        def forward(self, x, t):
            return self.loss(self.body(x), t)

    theirs = Head().to(device)
    ours = Head().to(device)
    ours.load_state_dict(theirs.state_dict())
    params = list(ours.parameters())
    assert pnn.convert(ours) is ours
    assert type(ours.loss) is pnn.LinearCrossEntropyLoss and type(ours.body) is pnn.Linear
    assert all(p is q for p, q in zip(params, ours.parameters()))  # parameters kept: an optimizer keeps working
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(10, H, dtype=torch.float64, device=device)
    t = _targets((10,), device, None)
    with on(backend):
        loss = ours(x, t)
    loss.backward()
    ref = theirs(x, t)
    ref.backward()
    assert_close(loss, ref)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad)
    assert type(pnn.convert(torch.nn.LinearCrossEntropyLoss(H, C))) is pnn.LinearCrossEntropyLoss


@needs_torch_module
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_module_scripting_says_what_to_use():
    with pytest.raises(RuntimeError, match="LinearCrossEntropyLoss is not supported.*torch.compile"):
        torch.jit.script(pnn.LinearCrossEntropyLoss(H, C))


def test_pyengine_nn_imports_without_torchs_module(monkeypatch):
    """On a torch without torch.nn.LinearCrossEntropyLoss (before 2.14) pyengine.nn has none either, and the rest
    of it works."""
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyLoss", raising=False)
    spec = importlib.util.spec_from_file_location("pyengine._nn_without_linear_cross_entropy_loss", pnn.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "LinearCrossEntropyLoss") and "LinearCrossEntropyLoss" not in module.__all__
    assert type(module.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)))[0]) is module.Linear

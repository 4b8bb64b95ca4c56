"""What every op test shares: the backend x device grid, the tolerance table, and the torch-parity helpers
(each of which tests/test_suite_catches.py shows rejecting a known-wrong result)."""
import contextlib
import ctypes
import gc
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyengine

HAS_CUDA = torch.cuda.is_available() and "cuda" in pyengine.available_backends()
_no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and pyengine's CUDA kernels")
_no_cpp = pytest.mark.skipif("cpp" not in pyengine.available_backends(), reason="pyengine._C is not built")

# (backend, device): the compiled backend for each device, and the python reference on each device.
BACKEND_DEVICES = [
    pytest.param("cpp", "cpu", id="cpp-cpu", marks=_no_cpp),
    pytest.param("python", "cpu", id="python-cpu"),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=_no_cuda),
    pytest.param("python", "cuda", id="python-cuda", marks=_no_cuda),
]
COMPILED_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "python"]

FLOAT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# The one tolerance table. float64 and float32 compare with torch directly (assert_close): |ours - torch| <=
# atol * M + rtol * |torch| elementwise, where M is the largest finite magnitude in torch's result. atol is scaled
# by M because sums that cancel lose digits relative to the terms they add, never absolutely: a fixed atol of 1e-5
# would accept an all-zero gradient whose elements are all about 1e-5.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}
# float16/bfloat16 compare errors against a float64 reference instead (assert_half_close), since torch's own half
# result is itself inexact: every element's error relative to its own magnitude is at most HALF_ERROR_FACTOR times
# torch's largest relative error, and never held below HALF_ERROR_FACTOR times HALF_MIN_ROUNDINGS roundings to the
# dtype: a result computed from a rounded half intermediate (a saved output, a hidden activation) carries that
# rounding and its own, however few elements torch happened to round badly.
HALF_ERROR_FACTOR = 2.0
HALF_MIN_ROUNDINGS = 2


@contextlib.contextmanager
def on(backend):
    with pyengine.use_backend(backend):
        yield


def magnitude(t):
    """The largest finite |value| of t as a Python float (0 for an empty or all-non-finite tensor)."""
    finite = t.detach().double().abs()
    finite = finite[torch.isfinite(finite)]
    return finite.max().item() if finite.numel() else 0.0


def assert_close(actual, expected, dtype=None, scale=None):
    """actual against torch's result: exact dtype and shape, values within TOL, NaN and infinities where torch
    has them. atol is scaled by the largest magnitude in expected, or by `scale` where the caller knows the
    size of the terms the result sums and they can cancel far below it (one class: p - y is 0 up to the
    rounding of terms of size 1; tanh's 1 - y^2 near saturation)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    tol = TOL[dtype or expected.dtype]
    size = magnitude(expected) if scale is None else max(magnitude(expected), float(scale))
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=tol["rtol"], atol=tol["atol"] * size)


def half_relative_errors(result, reference64, magnitude=None, slack=None):
    """(|result - reference| - slack, at least 0) / max(magnitude, the dtype's smallest normal) per element, in
    float64; magnitude defaults to |reference|, slack to 0."""
    ref = reference64.detach().double()
    mag = ref.abs() if magnitude is None else magnitude.detach().double().abs()
    err = (result.detach().double() - ref).abs()
    if slack is not None:
        err = (err - slack.detach().double()).clamp_min(0)
    return err / mag.clamp_min(torch.finfo(result.dtype).tiny)


def assert_half_close(actual, torch_result, reference64, magnitude=None, slack=None):
    """float16/bfloat16 against the float64 reference, element by element:
    - where the reference is not finite, or overflows the dtype, pyengine gives what torch gives (inf of the
      same sign, NaN);
    - everywhere else pyengine's error relative to the element's magnitude is at most HALF_ERROR_FACTOR times
      torch's largest such error among the elements where torch is finite, and never held below that many
      HALF_MIN_ROUNDINGS roundings to the dtype (eps / 2 each). An element where torch
      overflows while the reference does not is held to the same bound (torch's error there is infinite).
    magnitude: the size of the terms each element sums, where a sum can cancel far below them (a matrix
    product: |A| @ |B|, see product_magnitudes); default |reference|.
    slack: what an element may be off by, absolutely, where the float64 reference took one side of a choice that
    rounding can take either way (relu_kink_slack); taken off pyengine's error and torch's alike."""
    assert actual.shape == torch_result.shape, (actual.shape, torch_result.shape)
    assert actual.dtype == torch_result.dtype, (actual.dtype, torch_result.dtype)
    ours, theirs, ref = actual.detach().double(), torch_result.detach().double(), reference64.detach().double()
    special = ~torch.isfinite(ref) | (ref.abs() > torch.finfo(actual.dtype).max)
    same = (ours == theirs) | (ours.isnan() & theirs.isnan())
    assert same[special].all(), (
        f"{actual.dtype}: where the float64 reference is {ref[special & ~same][:5].tolist()} pyengine gives "
        f"{ours[special & ~same][:5].tolist()} and torch {theirs[special & ~same][:5].tolist()}")
    judged = ~special
    torch_finite = judged & torch.isfinite(theirs)
    our_err = half_relative_errors(actual, ref, magnitude, slack)[judged]
    torch_err = half_relative_errors(torch_result, ref, magnitude, slack)[torch_finite]
    torch_worst = torch_err.max().item() if torch_err.numel() else 0.0
    rounding = torch.finfo(actual.dtype).eps / 2
    bound = HALF_ERROR_FACTOR * max(torch_worst, HALF_MIN_ROUNDINGS * rounding)
    worst = our_err.nan_to_num(nan=float("inf")).max().item() if our_err.numel() else 0.0
    assert worst <= bound, (f"{actual.dtype}: largest relative error {worst:.3g} against float64 "
                            f"(element {our_err.nan_to_num(nan=float('inf')).argmax().item()} of those judged), "
                            f"bound {bound:.3g} (torch's largest {torch_worst:.3g}, one rounding {rounding:.3g})")


# The size of the terms of an activation's gradient dy * f'(x) where the backward computes it from the saved
# output y: sigmoid's y (1 - y) and tanh's 1 - y^2 cancel where y saturates, and there the output's own rounding
# sets their error. (relu and leaky_relu scale dy and need none.)
OUTPUT_GRADIENT_TERMS = {"sigmoid": lambda y: y.abs() + y * y, "tanh": lambda y: 1 + y * y}


def output_gradient_magnitude(op, y64, grad_out):
    """assert_half_close's magnitude for the input gradient of activation `op` (None: its own magnitude)."""
    terms = OUTPUT_GRADIENT_TERMS.get(op)
    return None if terms is None else grad_out.detach().double().abs() * terms(y64.detach().double())


# torch's own activations by the names fused_mlp and linear take
TORCH_ACTIVATIONS = {None: lambda z: z, "relu": torch.relu, "sigmoid": torch.sigmoid}


def layer_terms(x, layers, floor=0.0):
    """A stack of linear layers y = act(h @ W^T + b) in float64 from x (M, K0), layers a list of (W, b or None,
    act name or None): ([per layer: (act, m_h, W, z, m_z, y, act'(z))], output magnitude). m_h is the size of
    the layer input's terms, z its pre-activation and m_z = m_h @ |W|^T + |b| the size of the terms summed into
    z; the next layer's input has terms of size |y| + |act'(z)| m_z (its own rounding, and its input's error
    carried on), held at least `floor`."""
    h, m_h, terms = x.detach().double(), x.detach().double().abs(), []
    for w, b, act in layers:
        w64 = w.detach().double()
        z = h @ w64.T + (0 if b is None else b.detach().double())
        m_z = m_h @ w64.abs().T + (0 if b is None else b.detach().double().abs())
        y = TORCH_ACTIVATIONS[act](z)
        d_act = torch.ones_like(z) if act is None else (z > 0).double() if act == "relu" else y * (1 - y)
        terms.append((act, m_h, w64, z, m_z, y, d_act))
        h, m_h = y, (y.abs() + d_act * m_z).clamp_min(floor)
    return terms, m_h


def product_magnitudes(x, layers, grad_out, rounded_to=None):
    """The magnitudes assert_half_close takes for a stack of linear layers y = act(h @ W^T + b), computed in
    float64 from the float64 reference's values: x (M, K0); layers a list of (W, b or None, act name or None);
    grad_out (M, N_last). Each output element of a product is a sum whose terms have the size |A| @ |B|; its
    rounding error scales with that, however far the sum cancels. An activation carries its input's error on
    (times |act'|) beside its own rounding; its backward, computed from the saved output, has the terms of
    OUTPUT_GRADIENT_TERMS. Returns (output magnitude, [per layer: (dW, db) magnitudes], input-gradient
    magnitude).
    rounded_to: the float16/bfloat16 dtype the layers' outputs are rounded to where saved (default: x's dtype,
    where it is one). Below that dtype's smallest normal a rounded value's error is half a subnormal step, not
    eps / 2 of the value, so each layer output's magnitude is held at least there: a sigmoid output of 1e-6
    in float16 is off by up to 3%, and the gradient terms it scales with it (torch's and ours alike)."""
    dtype = rounded_to or x.dtype
    floor = torch.finfo(dtype).tiny if dtype in HALF_DTYPES else 0.0
    terms, m_out = layer_terms(x, layers, floor)
    m_g, grads = grad_out.detach().double().abs(), []
    for act, m_in, w64, _, _, y, d_act in reversed(terms):
        y_saved = torch.where(y.abs() < floor, torch.full_like(y, floor), y)
        m_dz = m_g * (OUTPUT_GRADIENT_TERMS[act](y_saved) if act in OUTPUT_GRADIENT_TERMS else d_act)
        grads.append((m_dz.T @ m_in, m_dz.sum(0)))
        m_g = m_dz @ w64.abs()
    return m_out, grads[::-1], m_g


# How near relu's kink a half-precision network's hidden unit may land on either side, in the dtype's epsilons of
# its input's terms (layer_terms' m_z): a layer that reads its input rounded to the dtype (torch's Sequential does)
# moves each term by up to half an epsilon, and the sum z by up to eps / 2 of their size; twice that covers the
# input's own carried error.
RELU_KINK_EPSILONS = 2


def relu_kink_slack(x, layers, grad_out, rounded_to=None):
    """assert_half_close's slack for the gradients of a stack of linear layers y = act(h @ W^T + b) (x, layers,
    grad_out as product_magnitudes takes them): where a relu's float64 input z lies within RELU_KINK_EPSILONS
    epsilons of the dtype (x's, or rounded_to) of its terms' size from 0, a half-precision result may put z on the
    other side, and relu's derivative (1 or 0) with it, dropping or keeping that unit's incoming gradient whole
    (one such unit of 65 moved a bias gradient by 2.5e-3 of its terms in a float16 run, where torch's largest
    error was 1.6e-4). The slack is |that gradient| at each such unit, carried back through the layers as a
    magnitude is (through a unit on either side of a kink, and scaled by the other activations' derivatives),
    into the weight, bias and input gradients. Elsewhere it is 0. Returns ([per layer: (dW, db) slack], the
    input gradient's slack), in float64."""
    width = RELU_KINK_EPSILONS * torch.finfo(rounded_to or x.dtype).eps
    terms, _ = layer_terms(x, layers)
    inputs = [x.detach().double().abs()] + [t[5].abs() for t in terms[:-1]]
    g = grad_out.detach().double()
    slack, out = torch.zeros_like(g), []
    for (act, _, w64, z, m_z, _, d_act), h in zip(reversed(terms), reversed(inputs)):
        if act == "relu":
            kink = (z.abs() <= width * m_z).double()
            slack_z = slack * torch.maximum(d_act, kink) + g.abs() * kink
        else:
            slack_z = slack * d_act.abs()
        out.append((slack_z.T @ h, slack_z.sum(0)))
        g, slack = (g * d_act) @ w64, slack_z @ w64.abs()
    return out[::-1], slack


def assert_raises_like(torch_call, our_call, match):
    """Where torch raises, pyengine raises the same exception type with torch's key phrase: `match` is a regular
    expression that torch's own message must match (so it is torch's phrase) and pyengine's message too. Never a
    crash, never a return."""
    with pytest.raises(Exception) as torch_exc:
        torch_call()
    assert re.search(match, str(torch_exc.value)), (
        f"torch's {type(torch_exc.value).__name__} no longer says {match!r}: {torch_exc.value}")
    with pytest.raises(type(torch_exc.value), match=match):
        our_call()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_bytes():
    """Bytes malloc has handed out and not had back (glibc's mallinfo2: in-use chunks plus mmap'd blocks). Not
    the resident size: a process that freed memory before reuses it without growing, so a leak would not show."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def memory_growth_per_call(call, device="cpu", calls=4000, windows=3):
    """Bytes the process keeps per call of `call` once warmed up: the smallest growth over `windows` runs of
    `calls` calls each (malloc's bytes in use on the CPU, torch's allocated bytes on CUDA). A leak grows in every
    window; allocator noise (a cache filling once) does not, so the smallest window tells."""
    def measure():
        gc.collect()
        return torch.cuda.memory_allocated() if device == "cuda" else _heap_bytes()

    for _ in range(calls // 4):
        call()
    growth = []
    for _ in range(windows):
        before = measure()
        for _ in range(calls):
            call()
        growth.append((measure() - before) / calls)
    return min(growth)


# A leak of the smallest output the memory test keeps, (16, 8) float32, costs more than 512 bytes per call.
MAX_GROWTH_PER_CALL = 64


def make(shape, dtype, device, requires_grad=False, low=-3.0, high=3.0, noncontiguous=False):
    """Fresh uniform values in [low, high); noncontiguous=True gives a strided view of the same shape."""
    if noncontiguous:
        big = torch.empty((*shape, 2), dtype=dtype, device=device).uniform_(low, high)
        t = big[..., 0]
    else:
        t = torch.empty(tuple(shape), dtype=dtype, device=device).uniform_(low, high)
    return t.requires_grad_(requires_grad)


def grads(out, inputs, grad_out=None):
    """Gradients of out (with a fresh random incoming gradient when none is given) w.r.t. inputs."""
    if grad_out is None:
        grad_out = torch.randn_like(out)
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True), grad_out


class _AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def backward_aten_calls(loss):
    """(aten op name, output shape) of every op that loss.backward() runs: to check that a backward makes no
    tensor it does not need (zeros for the gradients of an op's non-differentiable outputs)."""
    with _AtenLog() as log:
        loss.backward()
    return log.calls


@contextlib.contextmanager
def mkldnn_enabled(enabled):
    """torch.backends.mkldnn.enabled for a block (its flags() also sets TF32 options and warns about them)."""
    saved = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(saved)

"""Measuring: the callables of each op and model for each implementation, interleaved timing with
torch.utils.benchmark, the machine's copy bandwidth, errors against a float64 reference, CUDA peak memory.

An implementation ("impl") is "torch" (native torch), a peer of torch ("compile", "torch_chunked": peers.py) or
a pyengine backend name ("cpp", "cuda", "python"): pyengine's calls run inside pyengine.use_backend(impl), torch's
and its peers' outside any.
"""
import contextlib
import time

import torch
from torch.utils import benchmark

import pyengine

from . import peers
from .ops import LIBS, MODELS, NO_GRAD, OPS


def backend_ctx(impl):
    return contextlib.nullcontext() if peers.is_torch_side(impl) else pyengine.use_backend(impl)


def case(kind, name):
    return (OPS if kind == "op" else MODELS)[name]


def make_inputs(kind, name, size, dtype, device, seed=0):
    """The inputs every implementation of one case shares: the same values for pyengine and torch."""
    torch.manual_seed(seed)
    entry = case(kind, name)
    params = entry.sizes[size]
    if kind == "op":
        diff, other = entry.make(params, dtype, device)
        with torch.no_grad():
            out = entry.torch(*diff, *other)
        gout = torch.randn_like(out) if out.dim() else torch.ones_like(out)
        return diff, other, gout
    net, _ = entry.build(params[1], torch.nn)
    x, y = entry.data(params[0], params[1], dtype, device)
    return {k: v.to(device, dtype) for k, v in net.state_dict().items()}, x, y


def calls(kind, name, size, impl, inputs):
    """{mode: callable} for one implementation; the primed forward (for the backward mode) runs here, so call
    this inside backend_ctx(impl)."""
    entry = case(kind, name)
    if kind == "op":
        diff, other, gout = inputs
        fn = peers.op_function(entry, impl)
        args = diff + other
        plain = [t.detach() for t in diff] + other  # the same values, no gradient asked for
        primed = fn(*args)
        backward_fn = peers.backward_function(entry, impl, fn)
        retained = primed if backward_fn is fn else backward_fn(*args)  # primed is freed on return
        return {
            "forward": lambda: fn(*args),
            NO_GRAD: lambda: fn(*plain),
            "backward": lambda: torch.autograd.grad(retained, diff, gout, retain_graph=True),
            "forward+backward": lambda: torch.autograd.grad(fn(*args), diff, gout),
        }
    state, x, y = inputs
    side = "torch" if peers.is_torch_side(impl) else "pyengine"
    net, loss_fn = entry.build(entry.sizes[size][1], LIBS[side])
    net.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None).load_state_dict(state)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    if side == "pyengine" and entry.pyengine_step is not None:  # e.g. FusedMLP.training_step: one-call SGD
        step = entry.pyengine_step(net, x, y, 1e-3)
        step()
        return {"step": step}

    def forward_loss(x, y):
        return loss_fn(net(x), y)

    if impl == "compile":
        forward_loss = peers.compiled(forward_loss)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x, y)
        loss.backward()
        opt.step()
        return loss

    step()  # primes the optimizer like the primed forward of an op
    return {"step": step}


def _per_call(timer, number, ctx):
    with ctx():
        return timer.timeit(number).mean


# A row whose rounds' interquartile range exceeds this share of their median (pyengine's or torch's) is marked
# noisy: the machine's speed moved during it, and its speedup can be off by more than that in either direction.
NOISY_SPREAD = 0.2


def time_interleaved(fns, budget_s, min_rounds=3, max_rounds=40):
    """fns: {key: (callable, context factory)}. Each callable is warmed up, then timed in rounds that visit
    every key in turn (the order rotating), so drift in the machine's speed hits all of them alike.
    Returns {key: {"median": s, "iqr": s, "spread": iqr / median, "rounds": n}}."""
    threads = torch.get_num_threads()
    timers, number = {}, {}
    for key, (fn, ctx) in fns.items():
        timers[key] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        n, t = 1, _per_call(timers[key], 1, ctx)  # also the warm-up
        while t * n < 1e-3 and n < 10**6:  # calls too short to time alone: batch them
            n *= 10
            t = _per_call(timers[key], n, ctx)
        number[key] = (n, t)
    block = budget_s / (10 * max(len(fns), 1))  # aim for ~10 rounds within the budget
    for key, (_, t) in number.items():
        number[key] = max(1, min(int(block / max(t, 1e-9)), 10**6))
    times = {key: [] for key in fns}
    keys, start, rounds = list(fns), time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = keys[rounds % len(keys):] + keys[:rounds % len(keys)]
        for key in order:
            times[key].append(_per_call(timers[key], number[key], fns[key][1]))
        rounds += 1
    out = {}
    for key, ts in times.items():
        q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        median, iqr = q[1].item(), (q[2] - q[0]).item()
        out[key] = {"median": median, "iqr": iqr, "spread": iqr / median if median > 0 else None, "rounds": rounds}
    return out


def machine_bandwidth(device, nbytes=None, budget_s=0.5):
    """The machine's own memory bandwidth, GB/s: a large tensor copy (read + write) timed like the ops."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touches every page before timing
    timer = benchmark.Timer(stmt="dst.copy_(src)", globals={"dst": dst, "src": src},
                            num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=budget_s)
    return {"bytes": 2 * nbytes, "seconds": m.median, "gbps": 2 * nbytes / m.median / 1e9}


def _errors(actual, ref):
    """Relative error elementwise, |a - r| / max(|r|, 1e-3 rms(r)): the floor keeps entries that are zero or
    nearly so in the reference (cancelled sums, relu's zeros) from reading as huge relative errors."""
    a, r = actual.detach().double(), ref.detach().double()
    if r.numel() == 0:
        return 0.0, 0.0, 0
    floor = r.pow(2).mean().sqrt().item() * 1e-3 or 1.0
    rel = (a - r).abs() / r.abs().clamp_min(floor)
    return rel.max().item(), rel.sum().item(), rel.numel()


def _results(kind, name, size, impl, inputs):
    """[output, *gradients] of one forward+backward (op) or [loss, *parameter gradients] (model)."""
    entry = case(kind, name)
    if kind == "op":
        diff, other, gout = inputs
        fn = peers.op_function(entry, "torch" if impl == "float64" else impl)
        out = fn(*diff, *other)
        return [out, *torch.autograd.grad(out, diff, gout)]
    state, x, y = inputs
    net, loss_fn = entry.build(entry.sizes[size][1], LIBS["pyengine" if impl not in ("torch", "float64") else "torch"])
    net.to(device=x.device, dtype=x.dtype).load_state_dict(state)
    if impl not in ("torch", "float64") and entry.pyengine_step is not None:
        loss = entry.pyengine_step(net, x, y, 0.0)()  # lr 0: the step's loss and gradient, parameters kept
    else:
        loss = loss_fn(net(x), y)
        loss.backward()
    # one pooled gradient: FusedMLP's packed parameters are the Sequential's, concatenated in order
    return [loss, torch.cat([p.grad.reshape(-1) for p in net.parameters()])]


def _to64(t):
    return t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t


def numerics(kind, name, size, dtype, device, impls):
    """{impl: {"max_rel": ..., "mean_rel": ...} or {"error": ...}} against the float64 result of the same inputs
    (output and every gradient, pooled)."""
    inputs = make_inputs(kind, name, size, dtype, device, seed=1)
    if kind == "op":
        diff, other, gout = inputs
        inputs64 = ([_to64(t) for t in diff], [_to64(t) for t in other], gout.double())
    else:
        state, x, y = inputs
        inputs64 = ({k: v.double() for k, v in state.items()}, x.double(), _to64(y))
    ref = _results(kind, name, size, "float64", inputs64)
    out = {}
    for impl in impls:
        try:
            with backend_ctx(impl):
                got = _results(kind, name, size, impl, inputs)
        except Exception as exc:  # recorded in the row, never skipped silently
            out[impl] = {"error": describe_error(exc)}
            continue
        worst, total, count = 0.0, 0.0, 0
        for a, r in zip(got, ref):
            m, s, c = _errors(a, r)
            worst = m if m != m else max(worst, m)  # a NaN stays NaN
            total, count = total + s, count + c
        out[impl] = {"max_rel": worst, "mean_rel": total / max(count, 1)}
    return out


def peak_memory_cuda(kind, name, size, dtype, device, impl):
    """Bytes allocated above the inputs at the peak of one forward+backward (or training step) on CUDA."""
    inputs = make_inputs(kind, name, size, dtype, device)
    with backend_ctx(impl):
        fn = calls(kind, name, size, impl, inputs)["forward+backward" if kind == "op" else "step"]
        fn()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - base


def describe_error(exc):
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]

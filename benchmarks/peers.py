"""Peers: implementations of an op (or model) on torch's side beside torch eager, timed in the same interleaved
rounds as torch and pyengine, so that pyengine's speed reads against more than one baseline.

- `compile` (`--peer compile`): torch.compile (inductor, default mode, dynamic=False) of the very torch code the
  torch column runs (for a model, its forward and loss; zero_grad, backward and the SGD step stay eager). The
  first call of each mode compiles (the forward with grad traces forward and backward graphs, the no-grad call
  recompiles for inputs that need no gradient, the first backward compiles the backward): those first calls are
  timed apart and never enter a median. Dynamo's caches are reset before each case, so no case meets another's
  recompile limit and each case's compile time is its own.
- `torch_chunked`: torch's own chunked linear_cross_entropy (`torch.nn.functional.linear_cross_entropy` with
  `torch.nn.LinearCrossEntropyOptions()`, torch 2.14 and later), for the ops that define it
  (`ops.Op.torch_chunked`); always timed for them, with its peak memory. Where torch lacks it, its rows carry
  the error and the run goes on.
"""
import contextlib
import functools
import time

import torch

SELECTABLE = ("compile",)  # --peer; torch_chunked comes with the ops that have it
LABELS = {"compile": "compile", "torch_chunked": "torch chunked"}


def for_case(entry, kind, selected):
    """The peers timed for one op or model: those selected on the command line, then the op's own."""
    out = [p for p in selected if p in SELECTABLE]
    if kind == "op" and getattr(entry, "torch_chunked", None) is not None:
        out.append("torch_chunked")
    return out


def is_torch_side(impl):
    """torch and its peers run outside any pyengine backend."""
    return impl == "torch" or impl in LABELS


def compiled(fn):
    """torch.compile of fn, wrapped in a function of its own so that dynamo traces fn's torch calls (a builtin
    such as torch.sigmoid is traced as the call it is)."""
    def torch_code(*args):
        return fn(*args)

    return torch.compile(torch_code, dynamic=False)


def op_function(entry, impl):
    """The callable of one implementation of an op (for `compile`, a new compiled function: call once a case)."""
    if impl == "torch":
        return entry.torch
    if impl == "torch_chunked":
        return entry.torch_chunked
    if impl == "compile":
        return compiled(entry.torch)
    return entry.pyengine


def backward_function(entry, impl, fn):
    """The callable whose graph the backward-only timing reruns: fn itself, except torch's chunked path, whose
    backward consumes the gradients its forward computed unless told to keep them (at the cost of a copy)."""
    if impl == "torch_chunked":
        return functools.partial(entry.torch_chunked, allow_retain_graph=True)
    return fn


def reset_compiler():
    torch._dynamo.reset()


def _fresh_inductor_cache():
    """torch's own context for a fresh temporary inductor cache (fresh_cache; fresh_inductor_cache before 2.6)."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)
    return fresh() if fresh is not None else contextlib.nullcontext()


@contextlib.contextmanager
def compile_case(selected):
    """Around one case when the compiled peer is selected: dynamo reset before and after (no recompile limit
    carries over; the compiled code is freed) and inductor's caches fresh and empty, so the case compiles cold."""
    if "compile" not in selected:
        yield
        return
    reset_compiler()
    try:
        with _fresh_inductor_cache():
            yield
    finally:
        reset_compiler()


def start_compiler():
    """Compiles and differentiates a trivial function once, so that the compiler's one-time start in this process
    (imports, toolchain checks) is charged to no case. Returns its seconds, or None where compiling fails (each
    case's rows then carry the error)."""
    start = time.perf_counter()
    try:
        with compile_case(("compile",)):
            x = torch.ones(3, requires_grad=True)
            compiled(torch.sigmoid)(x).sum().backward()
            compiled(torch.sigmoid)(x.detach())
    except Exception:
        return None
    return time.perf_counter() - start


def graphs_compiled():
    """How many graphs dynamo has compiled in this process (a counter that only grows)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def row_fields(peer, mode, timed, pyengine_s, noisy_spread, errors, first_calls, caught):
    """A timing row's columns for one peer: its median, spread (and whether it is above noisy_spread), pyengine's
    speedup over it, its error, its first call (compile time for `compile`) and the first warning its first calls
    raised (a chunked path that fell back to the composition says so in a warning)."""
    mine = timed.get(peer, {})
    t, spread = mine.get("median"), mine.get("spread")
    return {f"{peer}_s": t, f"{peer}_iqr_s": mine.get("iqr"), f"{peer}_spread": spread,
            f"{peer}_noisy": spread is not None and spread > noisy_spread,
            f"speedup_vs_{peer}": t / pyengine_s if t and pyengine_s else None,
            f"{peer}_error": errors.get(peer), f"{peer}_first_call_s": first_calls.get(peer, {}).get(mode),
            f"{peer}_warning": caught.get(peer)}

"""Every op under stress: several Python threads at once, many calls without memory growth, and the same result
on every run for the same input."""
import threading

import pytest
import torch

from op_cases import OPS, run
from utils import MAX_GROWTH_PER_CALL, BACKEND_DEVICES, assert_close, memory_growth_per_call, on


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_threads_calling_at_once_get_torch_results(backend, device, op):
    errors = []

    def worker(seed):
        try:
            torch.manual_seed(seed)
            ours, theirs, args = OPS[op](device, torch.float64, (33, 17))
            for _ in range(20):
                with on(backend):  # use_backend is per thread (a context variable)
                    out, grads, g = run(ours, args)
                ref, ref_grads, _ = run(theirs, args, g)
                assert_close(out, ref)
                for a, b in zip(grads, ref_grads):
                    assert_close(a, b)
        except Exception as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[0]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_same_result_on_every_run(backend, device, op):
    ours, _, args = OPS[op](device, torch.float32, (3001, 19))
    with on(backend):
        out1, grads1, g = run(ours, args)
        out2, grads2, _ = run(ours, args, g)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_no_memory_growth_per_call(backend, device):
    """Forward+backward calls (all ops in turn) keep no memory: the process grows by less than a leak of the
    smallest output per call would make it."""
    cases = [OPS[op](device, torch.float32, (16, 8)) for op in sorted(OPS)]
    state = {"i": 0}

    def call():
        ours, _, args = cases[state["i"] % len(cases)]
        state["i"] += 1
        with on(backend):
            run(ours, args)

    growth = memory_growth_per_call(call, device)
    assert growth < MAX_GROWTH_PER_CALL, f"memory grew by {growth:.0f} bytes per call"

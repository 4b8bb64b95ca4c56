"""Peak memory of one forward+backward on CPU, where torch's allocator keeps no statistics.

The parent sends a list of cases to one fresh Python process (`python -m <this module>`), which for each case
makes the inputs, runs the forward+backward once to warm up, then resets the kernel's peak-RSS mark
(writing 5 to /proc/self/clear_refs), runs it again and reads VmHWM - VmRSS before: the resident memory the
step added above its inputs. glibc is told to hand every block of 64 KiB or more straight back to the system
on free (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so one case's freed memory is not reused by the next
and hidden from its count. For the same reason pyengine's cache of large CPU outputs is emptied before the base
RSS is read (pyengine.empty_cache()): the warm-up's blocks would otherwise be resident already and the step's
outputs would reuse them unseen, so the figure is what one step costs from an empty cache. Resolution: one
page, plus small blocks recycled inside the heap (a few KiB).
"""
import ctypes
import gc
import json
import os
import subprocess
import sys

import torch

import pyengine

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": None}


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_rss_of(fn, libc):
    pyengine.empty_cache()
    if libc is not None:
        libc.malloc_trim(0)
    base = _status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status("VmHWM:")
    del result
    return peak - base


def probe(tasks):
    from .harness import backend_ctx, calls, describe_error, make_inputs

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    x = torch.ones(2, requires_grad=True)
    torch.autograd.grad(x.sum(), x)  # autograd's lazy imports, once
    gc.freeze()  # what exists now is never garbage: later collections stay quick
    out = []
    for kind, name, size, dtype, impl in tasks:
        gc.collect()
        try:
            inputs = make_inputs(kind, name, size, getattr(torch, dtype), torch.device("cpu"))
            with backend_ctx(impl):
                fn = calls(kind, name, size, impl, inputs)["forward+backward" if kind == "op" else "step"]
                fn()
                out.append(min(_peak_rss_of(fn, libc) for _ in range(2)))
        except Exception as exc:
            out.append({"error": describe_error(exc)})
    return out


def peak_memory_cpu(tasks, threads, timeout=900):
    """[bytes or {"error": ...}] for tasks [(kind, name, size, dtype name, impl)], measured in one subprocess."""
    if not tasks:
        return []
    package = __name__.rsplit(".", 1)[0]
    top = sys.modules[package.split(".")[0]]
    root = os.path.dirname(os.path.dirname(os.path.abspath(top.__file__)))
    env = dict(os.environ)
    env.update({k: v for k, v in ENV.items() if v})
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(tasks), capture_output=True,
                          text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": f"memory probe exited with {proc.returncode}: {why}"[:200]}] * len(tasks)
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    print(json.dumps(probe(json.load(sys.stdin))))

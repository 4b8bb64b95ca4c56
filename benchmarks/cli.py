"""`python -m pyengine bench`: every op, forward (with and without grad), backward and forward+backward, on every
built backend of the chosen device, timed beside native torch in the same process (and beside torch.compile with
--peer compile, and torch's chunked linear_cross_entropy for that op and its LM head case), with bandwidth, memory
and numerics."""
import argparse
import datetime
import gc
import os
import platform
import sys
import time
import warnings

import torch

import pyengine
from pyengine import _backend

from . import harness, memory, peers, report
from .ops import GRAD_IN_FORWARD, MODELS, MODES, NO_GRAD, OPS, SIZES

DEVICE_BACKENDS = {"cpu": ("cpp", "python"), "cuda": ("cuda", "python")}
BUDGET = {"quick": 0.25, "full": 0.8}  # seconds of interleaved timing per (op, size, mode)


def parse(argv):
    p = argparse.ArgumentParser(prog="pyengine bench", description=__doc__)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    p.add_argument("--ops", help="comma-separated ops and end-to-end models (default: all): "
                                 + ", ".join(list(OPS) + list(MODELS)))
    p.add_argument("--backends", help="comma-separated pyengine backends (default: every built one that runs on "
                                      "the device: cpp and python on cpu, cuda and python on cuda)")
    p.add_argument("--dtype", default="float32", help="comma-separated dtypes (default float32): float32, float64, "
                                                      "float16, bfloat16; every op and model runs in each")
    p.add_argument("--peer", help="comma-separated extra implementations timed beside torch eager and pyengine in "
                                  "the same rounds: compile (torch.compile, inductor, default mode, dynamic=False, of "
                                  "the torch column's code; its compile time is reported apart, never in the "
                                  "medians; the table gains 'compile' and 'vs compile'). linear_cross_entropy and its "
                                  "LM head case always run torch's chunked path beside torch, where torch has it")
    p.add_argument("--quick", action="store_true", help="tiny and medium sizes, shorter timing (about a minute)")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md, speedup.png")
    p.add_argument("--sizes", help="comma-separated sizes to run, of " + ", ".join(SIZES)
                                   + " (default: all; tiny and medium with --quick; the LM head case, "
                                     "linear_cross_entropy_lm_head, is large only)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="seconds of interleaved timing per op, size and mode (default "
                        f"{BUDGET['full']}, {BUDGET['quick']} with --quick); more rounds steady a noisy machine")
    args = p.parse_args(argv)

    def pick(value, choices, what):
        if not value:
            return list(choices)
        names = [v.strip() for v in value.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            p.error(f"unknown {what} {', '.join(bad) or value!r}: choose from {', '.join(choices)}")
        return names

    args.ops = pick(args.ops, list(OPS) + list(MODELS), "op")
    args.sizes = pick(args.sizes, SIZES, "size") if args.sizes else (["tiny", "medium"] if args.quick else list(SIZES))
    args.dtypes = pick(args.dtype, ("float32", "float64", "float16", "bfloat16"), "dtype")
    args.peers = pick(args.peer, peers.SELECTABLE, "peer") if args.peer else []
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible to torch")
    runnable = [b for b in DEVICE_BACKENDS[args.device] if b in _backend.built_backends()]
    # by default every backend built for the device; one that is not built is named in the report, not hidden
    args.not_built = [b for b in DEVICE_BACKENDS[args.device] if b not in runnable]
    args.backends = pick(args.backends, DEVICE_BACKENDS[args.device], f"backend for {args.device}") \
        if args.backends else runnable
    missing = [b for b in args.backends if b not in runnable]
    if missing:
        p.error(f"backend {', '.join(missing)} is not built here (built: {', '.join(_backend.built_backends())}); "
                f"{_backend.BUILD_HINT}")
    if args.budget is not None and not args.budget > 0:
        p.error(f"--budget must be above 0 seconds, got {args.budget}")
    args.budget = args.budget or BUDGET["quick" if args.quick else "full"]
    return args


class Progress:
    """On a terminal, tqdm when it is installed, else a one-line bar; where stderr is a file or a pipe, one plain
    line per step, since a bar redrawn with carriage returns turns a log into one unreadable line."""

    def __init__(self, total, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.bar = None
        if self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=self.stream, dynamic_ncols=True, leave=False)
            except ImportError:
                pass
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self, what):
        self.done += 1
        if not self.tty:
            self.stream.write(f"[{self.done}/{self.total} {time.perf_counter() - self.start:.0f}s] {what}\n")
            self.stream.flush()
            return
        if self.bar is not None:
            self.bar.set_description_str(what[:48])
            self.bar.update(1)
            return
        filled = int(30 * self.done / max(self.total, 1))
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                          f"{time.perf_counter() - self.start:5.0f}s {what[:40]:<40}")
        self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from pyengine import _build_info

        build = {k.lower(): v for k, v in vars(_build_info).items() if k.isupper()}
    except ImportError:
        build = {}
    c = _backend._C
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "platform": platform.platform(),
        "pyengine": {"version": pyengine.__version__, "built_backends": _backend.built_backends(),
                     "simd_level": c.simd_level() if c is not None else None, "build": build},
    }


def _entries(args):
    """(kind, name, sizes to run) for every selected op and model."""
    out = []
    for name in args.ops:
        kind, entry = ("op", OPS[name]) if name in OPS else ("model", MODELS[name])
        sizes = [s for s in args.sizes if s in entry.sizes]
        if sizes:
            out.append((kind, name, sizes))
    return out


def _numerics_size(sizes):
    return "medium" if "medium" in sizes else sizes[0]


def _rate(amount, seconds, scale=1e9):
    return None if amount is None or not seconds else amount / seconds / scale


def timing_row(base, mode, impl, timed, floor, bw, peer_names=(), peer_info=None):
    """One row of the speed table: impl's and torch's timings of one mode ({impl: time_interleaved's entry}),
    the floor (bytes, flops) of that mode, the machine's copy bandwidth bw in GB/s, and the flags that say how
    far to trust it."""
    mine, theirs = timed.get(impl, {}), timed.get("torch", {})
    pe, t = mine.get("median"), theirs.get("median")
    nbytes, flops = floor
    share = _rate(nbytes, pe, bw * 1e9)
    spreads = [s for s in (mine.get("spread"), theirs.get("spread")) if s is not None]
    row = {
        **base, "mode": mode, "backend": impl, "pyengine_s": pe, "torch_s": t,
        "pyengine_iqr_s": mine.get("iqr"), "torch_iqr_s": theirs.get("iqr"),
        "pyengine_spread": mine.get("spread"), "torch_spread": theirs.get("spread"), "rounds": mine.get("rounds"),
        "speedup": t / pe if t and pe else None, "bytes": nbytes, "flops": flops,
        "pyengine_gbps": _rate(nbytes, pe), "torch_gbps": _rate(nbytes, t),
        "pyengine_bw_share": share, "torch_bw_share": _rate(nbytes, t, bw * 1e9),
        "pyengine_gflops": _rate(flops, pe), "torch_gflops": _rate(flops, t),
        "noisy": any(s > harness.NOISY_SPREAD for s in spreads),
        # faster than the machine's memory can feed it: the data sat in a cache (or the op skipped bytes the
        # floor counts), so a share of the memory bandwidth says nothing
        "cache_resident": share is not None and share > 1,
        "grad_in_forward": base["dtype"] in GRAD_IN_FORWARD.get(base["op"], ()),
        "pyengine_peak_bytes": None, "torch_peak_bytes": None,
    }
    for peer in peer_names:
        row.update(peers.row_fields(peer, mode, timed, pe, harness.NOISY_SPREAD, *(peer_info or ({}, {}, {}))))
    return row


def _prepare(kind, name, size, impl, inputs, modes):
    """impl's callables of every mode, each called once now (a failure is recorded here, not in the middle of the
    timing), with the seconds each first call took (compile time, for the compiled peer) and the first warning
    they raised."""
    first = {}
    with harness.backend_ctx(impl), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        fns = harness.calls(kind, name, size, impl, inputs)  # runs the first forward (or step): the primed one
        first[modes[0]] = time.perf_counter() - start
        for mode in modes[1:]:
            start = time.perf_counter()
            fns[mode]()
            first[mode] = time.perf_counter() - start
    warning = next((str(w.message).strip().splitlines()[0][:200] for w in caught if str(w.message).strip()), None)
    return fns, first, warning


def time_case(kind, name, size, dtype, device, impls, budget, bw, progress, selected_peers=(), compile_log=None):
    """Timing rows for one op (or model) at one size: every mode, every backend beside torch (and torch's
    peers). compile_log: a list that gets the compiled peer's first-call times of this case."""
    entry = harness.case(kind, name)
    params = entry.sizes[size]
    floor = entry.floor(params, torch.empty((), dtype=dtype).element_size())
    modes = MODES if kind == "op" else ("step",)
    base = {"kind": kind, "op": name, "size": size, "shape": entry.describe(params), "dtype": str(dtype)[6:],
            "device": device.type}
    case_peers = peers.for_case(entry, kind, selected_peers)
    rows, fns, errors, first, caught = [], {}, {}, {}, {}
    try:
        inputs = harness.make_inputs(kind, name, size, dtype, device)
    except Exception as exc:
        inputs, errors = None, {impl: harness.describe_error(exc) for impl in ["torch"] + case_peers + impls}
    graphs = peers.graphs_compiled()  # run inside peers.compile_case: dynamo starts from nothing for this case
    for impl in ["torch"] + case_peers + impls:
        if inputs is None:
            break
        try:
            fns[impl], first[impl], caught[impl] = _prepare(kind, name, size, impl, inputs, modes)
        except Exception as exc:
            errors[impl] = harness.describe_error(exc)
    for mode in modes:
        mode_floor = floor["forward" if mode == NO_GRAD else mode]  # no grad moves what the forward moves
        timed = harness.time_interleaved(
            {impl: (f[mode], lambda impl=impl: harness.backend_ctx(impl)) for impl, f in fns.items()}, budget)
        progress.step(f"{name} {size} {mode}")
        for impl in impls:
            rows.append({**timing_row(base, mode, impl, timed, mode_floor, bw, case_peers, (errors, first, caught)),
                         "error": errors.get(impl), "torch_error": errors.get("torch")})
    if "compile" in case_peers and compile_log is not None:
        times = first.get("compile", {})
        compile_log.append({**base, "first_call_s": times, "total_s": sum(times.values()) if times else None,
                            "graphs": peers.graphs_compiled() - graphs, "error": errors.get("compile"),
                            "warning": caught.get("compile")})
    del fns, inputs
    if size == "large":
        gc.collect()  # a collection costs ~0.1 s with torch loaded: only where it frees hundreds of MiB
    return rows


def run(args):
    device = torch.device(args.device)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    entries = _entries(args)
    n_cells = sum(len(sizes) * (len(MODES) if kind == "op" else 1) for kind, _, sizes in entries) * len(dtypes)
    progress = Progress(n_cells + len(entries) * len(dtypes) + 2)
    start = time.perf_counter()
    bw = harness.machine_bandwidth(device, budget_s=0.3 if args.quick else 1.0)
    progress.step("machine bandwidth")
    timings, numerics, compile_log = [], [], []
    compile_start = peers.start_compiler() if "compile" in args.peers else None
    try:
        for dtype in dtypes:
            for kind, name, sizes in entries:
                for size in sizes:
                    with peers.compile_case(args.peers):
                        timings += time_case(kind, name, size, dtype, device, args.backends, args.budget,
                                             bw["gbps"], progress, args.peers, compile_log)
                numerics += _numerics_rows(kind, name, _numerics_size(sizes), dtype, device, args.backends)
                progress.step(f"{name} numerics")
        _add_memory(timings, device, args.backends)
        progress.step("peak memory")
    finally:
        progress.close()
    return {
        "schema": 1, "machine": machine_info(device),
        "config": {"device": device.type, "dtypes": args.dtypes, "sizes": args.sizes, "ops": args.ops,
                   "backends": args.backends, "not_built": args.not_built, "quick": args.quick,
                   "budget_s": args.budget, "noisy_spread": harness.NOISY_SPREAD, "peers": args.peers},
        "bandwidth": bw, "timings": timings, "numerics": numerics, "compile": compile_log,
        "compile_start_s": compile_start,
        "seconds": time.perf_counter() - start,
    }


def _numerics_rows(kind, name, size, dtype, device, backends):
    """One numerics row per backend: pyengine's and torch's errors against float64 (and torch's chunked path's,
    for the ops that have it)."""
    chunked = peers.for_case(harness.case(kind, name), kind, ())
    impls = ["torch"] + chunked + backends
    try:
        errs = harness.numerics(kind, name, size, dtype, device, impls)
    except Exception as exc:  # the reference itself failed: say so on every backend's row
        errs = {impl: {"error": harness.describe_error(exc)} for impl in impls}
    rows = []
    for impl in backends:
        mine, theirs = errs[impl], errs["torch"]
        row = {"kind": kind, "op": name, "size": size, "dtype": str(dtype)[6:], "device": device.type,
               "backend": impl, "pyengine_max_rel": mine.get("max_rel"), "pyengine_mean_rel": mine.get("mean_rel"),
               "torch_max_rel": theirs.get("max_rel"), "torch_mean_rel": theirs.get("mean_rel"),
               "error": mine.get("error") or theirs.get("error")}
        for peer in chunked:
            row.update({f"{peer}_max_rel": errs[peer].get("max_rel"), f"{peer}_mean_rel": errs[peer].get("mean_rel"),
                        f"{peer}_error": errs[peer].get("error")})
        rows.append(row)
    return rows


def _add_memory(timings, device, backends):
    """Fills the peak memory of the forward+backward (and training step) rows, for pyengine and torch."""
    rows = [r for r in timings if r["mode"] in ("forward+backward", "step")]
    cases = list(dict.fromkeys((r["kind"], r["op"], r["size"], r["dtype"]) for r in rows))
    # torch's chunked path is measured beside torch; the compiled peer is not (a compile in the probe would cost
    # more than every other case together)
    tasks = [(*c, impl) for c in cases for impl in ["torch"] + _memory_peers(c) + backends]
    if device.type == "cpu":
        found = memory.peak_memory_cpu(tasks, torch.get_num_threads())
    else:
        found = []
        for kind, name, size, dtype, impl in tasks:
            try:
                found.append(harness.peak_memory_cuda(kind, name, size, getattr(torch, dtype), device, impl))
            except Exception as exc:
                found.append({"error": harness.describe_error(exc)})
    peak = {tuple(t): f for t, f in zip(tasks, found)}
    for r in rows:
        key = (r["kind"], r["op"], r["size"], r["dtype"])
        r["pyengine_peak_bytes"] = peak.get((*key, r["backend"]))
        r["torch_peak_bytes"] = peak.get((*key, "torch"))
        for peer in _memory_peers(key):
            r[f"{peer}_peak_bytes"] = peak.get((*key, peer))


def _memory_peers(case):
    kind, name = case[:2]
    return [p for p in peers.for_case(harness.case(kind, name), kind, ()) if p != "compile"]


def main(argv=None):
    args = parse(argv)
    results = run(args)
    skipped = report.write_all(results, args.out)
    print(report.text(results))
    print(f"\nresults: {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}"
          + (f"; plot skipped: {skipped}" if skipped else f", {os.path.join(args.out, 'speedup.png')}")
          + f" ({results['seconds']:.0f} s)")
    return 0

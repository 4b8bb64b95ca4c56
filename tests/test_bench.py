"""The benchmark harness itself (schema, coverage, outputs, flags, CLI), never speed: a tiny configuration that
runs in seconds (--sizes tiny and a small --budget)."""
import gc
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from pyengine.__main__ import _benchmarks
from pyengine.__main__ import main as pyengine_main

bench = _benchmarks()
from importlib import import_module  # noqa: E402

ops = import_module(bench.__name__ + ".ops")
report = import_module(bench.__name__ + ".report")
cli = import_module(bench.__name__ + ".cli")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--sizes", "tiny", "--budget", "0.01"]


def _load(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    assert bench.main(TINY + ["--out", out]) == 0
    return out, _load(out)


def test_json_schema(full_run):
    _, res = full_run
    assert res["schema"] == 1
    m = res["machine"]
    for key in ("cpu", "cores", "torch_threads", "torch", "python", "date", "pyengine"):
        assert m[key] is not None, key
    assert {"version", "built_backends", "build"} <= set(m["pyengine"])
    assert res["bandwidth"]["gbps"] > 0
    assert res["config"]["device"] == "cpu" and res["config"]["dtypes"] == ["float32"]
    assert res["timings"] and res["numerics"]
    assert res["config"]["noisy_spread"] > 0
    for r in res["timings"]:
        for key in ("kind", "op", "size", "shape", "mode", "dtype", "device", "backend", "pyengine_s", "torch_s",
                    "speedup", "bytes", "flops", "pyengine_gbps", "torch_gbps", "pyengine_bw_share",
                    "pyengine_gflops", "pyengine_peak_bytes", "torch_peak_bytes", "error", "torch_error",
                    "pyengine_spread", "torch_spread", "noisy", "cache_resident", "grad_in_forward"):
            assert key in r, key
        assert r["torch_s"] > 0 and r["torch_error"] is None and r["torch_spread"] >= 0
        assert r["grad_in_forward"] == (r["op"] in ops.GRAD_IN_FORWARD)
        assert r["cache_resident"] == (r["pyengine_bw_share"] is not None and r["pyengine_bw_share"] > 1)
        if r["error"] is None:
            assert r["pyengine_s"] > 0 and r["speedup"] > 0 and r["pyengine_spread"] >= 0
            assert r["noisy"] == (max(r["pyengine_spread"], r["torch_spread"]) > res["config"]["noisy_spread"])
        else:
            assert r["pyengine_s"] is None  # a failing backend is recorded with its error, not timed
        if r["mode"] in ("forward+backward", "step"):
            assert r["torch_peak_bytes"] is not None and r["pyengine_peak_bytes"] is not None
        if r["op"] == "linear":
            assert r["flops"] > 0 and (r["error"] or r["pyengine_gflops"] > 0)
    for n in res["numerics"]:
        assert n["error"] or (n["pyengine_max_rel"] >= 0 and n["torch_max_rel"] >= 0)


def test_every_op_mode_and_backend_present(full_run):
    _, res = full_run
    seen = {(r["op"], r["mode"], r["backend"]) for r in res["timings"]}
    tiny_ops = {name for name, op in ops.OPS.items() if "tiny" in op.sizes}  # the LM head case is large only
    assert set(ops.OPS) - tiny_ops == {"linear_cross_entropy_lm_head"}
    for backend in res["config"]["backends"]:
        for name in tiny_ops:
            for mode in ops.MODES:
                assert (name, mode, backend) in seen
        for name in ops.MODELS:
            assert (name, "step", backend) in seen
    assert {n["op"] for n in res["numerics"]} == tiny_ops | set(ops.MODELS)
    assert {"linear", "relu", "sigmoid", "add", "cross_entropy"} <= set(ops.OPS)


def test_outputs_written(full_run):
    out, res = full_run
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| cross_entropy |" in md and "## Numerics" in md
    assert "spread pe/torch" in md and "rows are marked noisy" in md
    assert report.plot_data(res)["sizes"] == ["tiny"]  # only the sizes that ran get a place in the plot
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in res["plot_skipped"]
    else:
        assert res["plot"] == "speedup.png" and os.path.getsize(os.path.join(out, "speedup.png")) > 1000


def test_ops_filtering_and_backend_errors_recorded(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(ops.OPS["relu"], "pyengine", boom)
    argv = TINY + ["--ops", "relu,sigmoid,mlp_notes", "--backends", "python", "--out", str(tmp_path)]
    assert bench.main(argv) == 0  # a failing backend is recorded, and the run goes on
    res = _load(tmp_path)
    assert {r["op"] for r in res["timings"]} == {"relu", "sigmoid", "mlp_notes"}
    assert {r["backend"] for r in res["timings"]} == {"python"}
    relu = [r for r in res["timings"] if r["op"] == "relu"]
    assert len(relu) == len(ops.MODES) and all("kernel exploded" in r["error"] and r["torch_s"] > 0 for r in relu)
    assert all(r["error"] is None and r["pyengine_s"] > 0 for r in res["timings"] if r["op"] != "relu")
    assert "kernel exploded" in next(n for n in res["numerics"] if n["op"] == "relu")["error"]


def test_cli_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "pyengine", "bench", *TINY, "--ops", "relu", "--backends", "python"]
    done = subprocess.run(cmd + ["--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "relu" in done.stdout and os.path.exists(tmp_path / "results.json")
    bad = subprocess.run(cmd + ["--ops", "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown op 'nope'" in bad.stderr


def test_plot_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    res = {"timings": [], "config": {"device": "cpu", "dtypes": ["float32"]}}
    assert "pip install matplotlib" in report.plot(res, str(tmp_path / "p.png"))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = Terminal()
    bar = cli.Progress(2, terminal)
    bar.step("relu tiny forward")
    bar.step("relu tiny backward")
    bar.close()
    assert "2/2" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_progress_in_a_log_is_plain_lines(capsys):
    """stderr to a file or pipe (pytest's capture is one): a line per step, no bar redrawn with carriage returns."""
    bar = cli.Progress(2)
    bar.step("relu tiny forward")
    bar.step("relu tiny backward")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err
    assert [line.split("] ")[1] for line in err.splitlines()] == ["relu tiny forward", "relu tiny backward"]


def test_help_documents_sizes_and_budget(capsys):
    with pytest.raises(SystemExit) as exit_:
        pyengine_main(["bench", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # as argparse wraps it to the terminal's width
    assert "--sizes" in out and "--budget" in out and "tiny, medium, large" in out
    assert "--peer" in out and "torch.compile" in out and "chunked" in out and "bfloat16" in out
    with pytest.raises(SystemExit):  # once read as "no budget given" and replaced by the default
        cli.parse(["--budget", "0"])


def test_timing_row_flags_noisy_cache_resident_and_grad_in_forward():
    base = {"kind": "op", "op": "relu", "size": "medium", "shape": "1024x1024", "dtype": "float32", "device": "cpu"}
    steady = {"median": 1e-3, "iqr": 5e-5, "spread": 0.05, "rounds": 10}
    shaky = {"median": 1e-3, "iqr": 4e-4, "spread": 0.4, "rounds": 10}
    floor = (8e6, None)  # 8 MB in 1 ms: 8 GB/s

    def row(mine, torch_t, bw=20.0, op="relu", mode="forward"):
        return cli.timing_row({**base, "op": op}, mode, "cpp", {"cpp": mine, "torch": torch_t}, floor, bw)

    calm = row(steady, steady)
    assert calm["pyengine_spread"] == 0.05 and calm["pyengine_bw_share"] == pytest.approx(0.4)
    assert not calm["noisy"] and not calm["cache_resident"] and not calm["grad_in_forward"]
    assert row(shaky, steady)["noisy"] and row(steady, shaky)["noisy"]  # either side's spread counts
    assert row(steady, steady, bw=5.0)["cache_resident"]  # 8 GB/s from a machine that copies at 5
    assert row(steady, steady, op="cross_entropy", mode="backward")["grad_in_forward"]
    half = cli.timing_row({**base, "op": "cross_entropy", "dtype": "float16"}, "backward", "cpp",
                          {"cpp": steady, "torch": steady}, floor, 20.0)
    assert not half["grad_in_forward"]  # in float16 pyengine's cross_entropy computes its gradient in the backward


def _row(op="relu", size="tiny", mode="forward+backward", speedup=2.0, **flags):
    return {"kind": "model" if mode == "step" else "op", "op": op, "size": size, "shape": "8x8", "mode": mode,
            "dtype": "float32", "device": "cpu", "backend": "cpp", "pyengine_s": 1e-3 / speedup, "torch_s": 1e-3,
            "pyengine_spread": 0.3 if flags.get("noisy") else 0.01, "torch_spread": 0.01, "speedup": speedup,
            "pyengine_gbps": 10.0, "pyengine_bw_share": 1.5 if flags.get("cache_resident") else 0.5,
            "pyengine_gflops": None, "error": None, "torch_error": None,
            **{"noisy": False, "cache_resident": False, "grad_in_forward": op in ops.GRAD_IN_FORWARD, **flags}}


def _results(rows):
    return {"timings": rows, "numerics": [], "seconds": 1.0,
            "config": {"device": "cpu", "dtypes": ["float32"], "sizes": ["tiny", "medium"], "backends": ["cpp"],
                       "noisy_spread": 0.2},
            "bandwidth": {"gbps": 20.0, "bytes": 2**29},
            "machine": {"cpu": "test", "torch_threads": 2, "torch": "2", "gpu": None}}


def test_report_marks_noisy_cache_resident_and_grad_in_forward_rows():
    rows = [_row(mode="forward", cache_resident=True), _row(noisy=True),
            _row("cross_entropy", mode="backward", speedup=1000.0, cache_resident=True),
            _row("cross_entropy", mode="forward")]
    table = report.time_rows(_results(rows))
    bw, note = report.TIME_HEADER.index("%BW"), report.TIME_HEADER.index("note")
    assert [r[bw] for r in table] == ["cache", "50%", "cache", "50%"]
    assert table[1][note] == "noisy" and table[0][note] == ""
    assert table[1][report.TIME_HEADER.index("spread pe/torch")] == "30% / 1%"
    assert "backward only scales" in table[2][note] and "forward computes the gradient" in table[3][note]
    text = report.text(_results(rows))
    assert "1 of 4 rows are marked noisy: a spread above 20%" in text and "%BW cache:" in text
    assert "cross_entropy: pyengine's forward also computes the gradient" in text


def test_plot_draws_forward_backward_bars_of_the_sizes_that_ran():
    rows = [_row(mode=m, size=s) for s in ("tiny", "medium") for m in ops.MODES]
    rows += [_row("cross_entropy", mode="backward", speedup=1000.0), _row("cross_entropy", noisy=True),
             _row("mlp_notes", mode="step", speedup=0.5)]
    data = report.plot_data(_results(rows))
    assert data["sizes"] == ["tiny", "medium"] and data["panels"] == ["backend cpp"]
    assert data["ops"] == ["relu", "cross_entropy", "mlp_notes (step)"]
    bars = {(b["op"], b["size"]): b for b in data["bars"]}
    assert set(bars) == {("relu", "tiny"), ("relu", "medium"), ("cross_entropy", "tiny"), ("mlp_notes (step)", "tiny")}
    assert bars["cross_entropy", "tiny"]["speedup"] == 2.0  # forward+backward, not the backward's 1000x
    assert [b["noisy"] for b in data["bars"]] == [False, False, True, False]


def test_forward_without_grad_is_its_own_mode(full_run):
    """Every op has a forward on inputs that need no gradient: the row that judges the forward of the losses whose
    training forward computes the gradient too, and the per-call cost of a plain functional call."""
    _, res = full_run
    no_grad = [r for r in res["timings"] if r["mode"] == ops.NO_GRAD]
    assert {r["op"] for r in no_grad} == {n for n, op in ops.OPS.items() if "tiny" in op.sizes}
    forward = {(r["op"], r["backend"]): r for r in res["timings"] if r["mode"] == "forward"}
    for r in no_grad:
        assert r["error"] or r["pyengine_s"] > 0
        assert r["bytes"] == forward[r["op"], r["backend"]]["bytes"]  # it moves what the forward moves
    note, mode = report.TIME_HEADER.index("note"), report.TIME_HEADER.index("mode")
    lce = {t[mode]: t[note] for t in report.time_rows(res) if t[0] == "linear_cross_entropy"}
    assert "forward computes the gradient" in lce["forward"]
    assert "gradient" not in lce[ops.NO_GRAD]  # the no-grad row is not marked: it compares like with like


def test_torch_chunked_path_beside_linear_cross_entropy(full_run):
    _, res = full_run
    rows = [r for r in res["timings"] if r["op"] == "linear_cross_entropy"]
    assert rows and all("torch_chunked_s" in r for r in rows)
    assert not any("torch_chunked_s" in r for r in res["timings"] if r["op"] != "linear_cross_entropy")
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):  # torch < 2.14: each row says so, the run goes on
        assert all("linear_cross_entropy" in (r["torch_chunked_error"] or "") for r in rows)
        return
    for r in rows:
        assert r["torch_chunked_error"] is None and r["torch_chunked_s"] > 0
        assert r["speedup_vs_torch_chunked"] == pytest.approx(r["torch_chunked_s"] / r["pyengine_s"])
        if r["mode"] == "forward+backward":
            assert r["torch_chunked_peak_bytes"] is not None
    numerics = [n for n in res["numerics"] if n["op"] == "linear_cross_entropy"]
    assert all(n["torch_chunked_max_rel"] < 1e-2 for n in numerics)
    text = report.text(res)
    assert "torch chunked" in text and "peak MiB pe/torch/chunked" in text
    assert "compile" not in report.time_header(res)  # without --peer the speed table is as it was


def test_torch_without_chunked_path_says_so(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.nn, "LinearCrossEntropyOptions", raising=False)  # as on torch before 2.14
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    argv = TINY + ["--ops", "linear_cross_entropy", "--backends", "cpp", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    res = _load(tmp_path)
    for r in res["timings"]:
        assert "has no chunked linear_cross_entropy" in r["torch_chunked_error"] and r["torch_chunked_s"] is None
        assert r["pyengine_s"] > 0 and r["torch_s"] > 0
    assert "torch chunked: RuntimeError" in report.numeric_rows(res)[0][-1]


def test_lm_head_case_in_float32_and_bfloat16(monkeypatch, tmp_path):
    """The LM head case (large only, 4096x1024 -> 32000) run at a small shape: pyengine, torch's composition and
    torch's chunked path, time and peak memory side by side, in both dtypes."""
    lm_head = ops.OPS["linear_cross_entropy_lm_head"]
    assert lm_head.sizes == {"large": (4096, 1024, 32000)}
    monkeypatch.setattr(lm_head, "sizes", {"tiny": (64, 16, 50)})
    argv = TINY + ["--ops", "linear_cross_entropy_lm_head", "--backends", "cpp", "--dtype", "float32,bfloat16",
                   "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    res = _load(tmp_path)
    assert {(r["dtype"], r["mode"]) for r in res["timings"]} == {(d, m) for d in ("float32", "bfloat16")
                                                                  for m in ops.MODES}
    chunked = hasattr(torch.nn.functional, "linear_cross_entropy")  # torch 2.14 and later
    for r in res["timings"]:
        assert r["error"] is None and (r["torch_chunked_error"] is None) == chunked
        assert r["pyengine_s"] > 0 and r["torch_s"] > 0 and (not chunked or r["torch_chunked_s"] > 0)
        if r["mode"] == "forward+backward":  # measured (the probe's process knows only the large shape: an error)
            keys = ["pyengine_peak_bytes", "torch_peak_bytes"] + (["torch_chunked_peak_bytes"] if chunked else [])
            assert all(r[k] is not None for k in keys)
    assert len(report.chunked_rows(res)) == 2 * len(ops.MODES)
    assert {n["dtype"] for n in res["numerics"]} == {"float32", "bfloat16"}
    memory = import_module(bench.__name__ + ".memory")
    impls = ("cpp", "torch", "torch_chunked") if chunked else ("cpp", "torch")
    peaks = memory.probe([("op", lm_head.name, "tiny", "bfloat16", impl) for impl in impls])
    gc.unfreeze()  # the probe freezes what exists, for its own process
    assert all(isinstance(p, int) for p in peaks), peaks


def test_bfloat16_covers_every_op_and_model(tmp_path):
    assert bench.main(TINY + ["--dtype", "bfloat16", "--backends", "cpp", "--out", str(tmp_path)]) == 0
    res = _load(tmp_path)
    tiny = {n for n, op in ops.OPS.items() if "tiny" in op.sizes} | set(ops.MODELS)
    assert {r["op"] for r in res["timings"]} == tiny and {n["op"] for n in res["numerics"]} == tiny
    for r in res["timings"]:
        assert r["error"] is None and r["torch_error"] is None and r["pyengine_s"] > 0, r["op"]
    for n in res["numerics"]:
        assert n["error"] is None and n["pyengine_max_rel"] >= 0 and n["torch_max_rel"] >= 0, n["op"]


def test_compile_peer_timed_beside_torch_and_pyengine(tmp_path):
    argv = TINY + ["--ops", "relu,mlp_notes", "--backends", "cpp", "--peer", "compile", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    res = _load(tmp_path)
    assert res["config"]["peers"] == ["compile"]
    assert res["compile_start_s"] > 0  # the compiler's one-time start, charged to no case
    for r in res["timings"]:
        assert r["compile_error"] is None and r["compile_s"] > 0, r["mode"]
        assert r["speedup_vs_compile"] == pytest.approx(r["compile_s"] / r["pyengine_s"])
        assert r["compile_first_call_s"] > 0
    relu, model = res["compile"]
    assert set(relu["first_call_s"]) == set(ops.MODES) and set(model["first_call_s"]) == {"step"}
    # the forward with grad and the no-grad forward each compile a graph; the medians never include them
    assert relu["graphs"] >= 2 and relu["total_s"] == pytest.approx(sum(relu["first_call_s"].values()))
    header = report.time_header(res)
    assert header[header.index("speedup") + 1:][:2] == ["compile", "vs compile"]
    text = report.text(res)
    assert "torch.compile first calls" in text and "vs compile" in text


def test_compile_failure_is_recorded_not_fatal(monkeypatch, tmp_path):
    def broken(fn):
        def call(*args):
            raise RuntimeError("inductor exploded")
        return call

    peers = import_module(bench.__name__ + ".peers")
    monkeypatch.setattr(peers, "compiled", broken)
    argv = TINY + ["--ops", "relu", "--backends", "cpp", "--peer", "compile", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    res = _load(tmp_path)
    for r in res["timings"]:
        assert "inductor exploded" in r["compile_error"] and r["compile_s"] is None and r["pyengine_s"] > 0
    assert "inductor exploded" in res["compile"][0]["error"]
    note = report.time_header(res).index("note")
    assert all("compile failed: RuntimeError: inductor exploded" in t[note] for t in report.time_rows(res))
    with pytest.raises(SystemExit):
        cli.parse(["--peer", "tensorrt"])

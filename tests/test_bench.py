"""The benchmark harness itself (schema, coverage, outputs, CLI), never speed: a tiny configuration that runs in
seconds (the hidden --sizes tiny and --budget options)."""
import json
import os
import subprocess
import sys

import pytest

from pyengine.__main__ import _benchmarks

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
    for r in res["timings"]:
        for key in ("kind", "op", "size", "shape", "mode", "dtype", "device", "backend", "pyengine_s", "torch_s",
                    "speedup", "bytes", "flops", "pyengine_gbps", "torch_gbps", "pyengine_bw_share",
                    "pyengine_gflops", "pyengine_peak_bytes", "torch_peak_bytes", "error", "torch_error"):
            assert key in r, key
        assert r["torch_s"] > 0 and r["torch_error"] is None
        if r["error"] is None:
            assert r["pyengine_s"] > 0 and r["speedup"] > 0
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
    for backend in res["config"]["backends"]:
        for name in ops.OPS:
            for mode in ops.MODES:
                assert (name, mode, backend) in seen
        for name in ops.MODELS:
            assert (name, "step", backend) in seen
    assert {n["op"] for n in res["numerics"]} == set(ops.OPS) | set(ops.MODELS)
    assert {"linear", "relu", "sigmoid", "add", "cross_entropy"} <= set(ops.OPS)


def test_outputs_written(full_run):
    out, res = full_run
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| cross_entropy |" in md and "## Numerics" in md
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
    assert len(relu) == 3 and all("kernel exploded" in r["error"] and r["torch_s"] > 0 for r in relu)
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


def test_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = cli.Progress(2)
    bar.step("relu tiny forward")
    bar.step("relu tiny backward")
    bar.close()
    assert "2/2" in capsys.readouterr().err

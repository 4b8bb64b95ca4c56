"""Backend choice: what is built, how a backend is picked, and what happens when one is missing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyengine
import pyengine.functional as PF
from pyengine import _backend
from utils import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """Runs code in a fresh interpreter from the repo root; returns (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_available_backends():
    avail = pyengine.available_backends()
    assert avail[-1] == "python" and set(avail) <= {"cpp", "cuda", "python"}
    assert set(avail) <= set(pyengine.built_backends())
    assert ("cuda" in avail) == ("cuda" in pyengine.built_backends() and torch.cuda.is_available())


def test_use_backend_nests_and_restores():
    assert pyengine.current_backend() is None
    with pyengine.use_backend("python"):
        assert pyengine.current_backend() == "python"
        if "cpp" in pyengine.available_backends():
            with pyengine.use_backend("cpp"):
                assert _backend.select(torch.device("cpu")) == "cpp"
        assert _backend.select(torch.device("cpu")) == "python"
    assert pyengine.current_backend() is None


def test_expected_backends_are_built():
    """CI names what it built (PYENGINE_EXPECT_BACKENDS=cpp,cuda): a missing one fails here instead of its tests
    skipping or falling back to python."""
    assert not _backend.missing_expected_backends(), _backend.missing_expected_backends()


def test_expectation_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_IMPORT_ERROR", ImportError("no pyengine/_C*.so"))
    assert _backend.missing_expected_backends("cpp, python") == [
        ("cpp", "importing pyengine._C failed (no pyengine/_C*.so)")]
    with pytest.raises(ValueError, match="unknown pyengine backend 'gpu'"):
        _backend.missing_expected_backends("gpu")


def test_info_check_fails_when_an_expected_backend_is_missing(monkeypatch, capsys):
    from pyengine.__main__ import main

    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_IMPORT_ERROR", ImportError("no pyengine/_C*.so"))
    monkeypatch.setenv(_backend.EXPECT_ENV, "cpp")
    assert main(["info", "--check"]) == 1
    assert "backend 'cpp' is expected (PYENGINE_EXPECT_BACKENDS) but not built" in capsys.readouterr().err
    monkeypatch.setenv(_backend.EXPECT_ENV, "python")
    assert main(["info", "--check"]) == 1  # the extension itself does not import
    assert main(["info"]) == 0


def test_default_picks_by_device():
    expected = "cpp" if "cpp" in pyengine.built_backends() else "python"
    assert _backend.select(torch.device("cpu")) == expected


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown pyengine backend 'triton'"):
        with pyengine.use_backend("triton"):
            pass


@pytest.mark.skipif("cuda" in pyengine.built_backends(), reason="this build has the CUDA kernels")
def test_unbuilt_cuda_backend_says_how_to_build():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not built.*PYENGINE_CUDA=1 pip install"):
        with pyengine.use_backend("cuda"):
            pass


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and pyengine's CUDA kernels")
def test_cuda_backend_refuses_cpu_tensors():
    with pyengine.use_backend("cuda"), pytest.raises(RuntimeError, match="chosen by pyengine.use_backend, runs on "
                                                                         "cuda tensors"):
        PF.relu(torch.ones(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_backend_without_a_gpu_is_refused_when_chosen():
    with pytest.raises(RuntimeError, match="needs a GPU, and none is visible here|is not built"):
        pyengine.use_backend("cuda")
    assert pyengine.current_backend() is None


def test_use_backend_as_a_plain_call_sets_it_until_changed():
    """Like torch.set_grad_enabled: a plain call sets the backend for this thread from then on; a `with` block
    restores what was there before."""
    import contextvars

    def body():
        pyengine.use_backend("python")
        assert pyengine.current_backend() == "python"
        assert _backend.select(torch.device("cpu")) == "python"
        if "cpp" in pyengine.available_backends():
            with pyengine.use_backend("cpp"):
                assert pyengine.current_backend() == "cpp"
        assert pyengine.current_backend() == "python"

    contextvars.copy_context().run(body)  # a copy: the test leaves the suite's own context untouched
    assert pyengine.current_backend() is None
    with pytest.raises(ValueError, match="unknown pyengine backend 'tpu'"):
        pyengine.use_backend("tpu")


def test_environment_variable_errors_name_it():
    code, _, err = run_python("""
        import torch, pyengine.functional as PF
        PF.relu(torch.ones(3))
    """, PYENGINE_BACKEND="cuda")
    assert code != 0 and "PYENGINE_BACKEND" in err, err


def test_backward_runs_on_the_forward_backend(monkeypatch):
    """The backend chosen in forward also runs that call's backward, even outside the `with` block."""
    calls = []
    original = _backend.REFERENCE.relu_backward
    monkeypatch.setattr(_backend.REFERENCE, "relu_backward", lambda g, y: calls.append(1) or original(g, y))
    x = torch.randn(5, requires_grad=True)
    with pyengine.use_backend("python"):
        y = PF.relu(x)
    y.sum().backward()
    assert calls == [1]


def test_environment_variable_chooses_backend():
    code, out, err = run_python("""
        import torch, pyengine, pyengine.functional as PF
        from pyengine import _backend
        print(pyengine.current_backend(), _backend.select(torch.device("cpu")))
    """, PYENGINE_BACKEND="python")
    assert code == 0, err
    assert out.split() == ["python", "python"]


def test_bad_environment_variable_is_rejected():
    code, _, err = run_python("import pyengine", PYENGINE_BACKEND="fortran")
    assert code != 0 and "PYENGINE_BACKEND='fortran': unknown pyengine backend 'fortran'" in err


def test_without_extension_falls_back_to_python_and_warns_once():
    code, out, err = run_python("""
        import sys, warnings
        class Block:  # makes `import pyengine._C` fail, as on a machine where it was never built
            def find_spec(self, name, path=None, target=None):
                if name == "pyengine._C":
                    raise ImportError("pyengine._C blocked for this test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, pyengine, pyengine.functional as PF
            import pyengine.nn
        print(sum("falling back to the python backend" in str(w.message) for w in caught))
        print(",".join(pyengine.available_backends()))
        x = torch.randn(4, 3, requires_grad=True)
        PF.cross_entropy(PF.relu(PF.linear(x, torch.randn(5, 3))), torch.tensor([0, 1, 2, 4])).backward()
        print(x.grad.shape == x.shape)
        try:
            pyengine.use_backend("cpp").__enter__()
        except RuntimeError as e:
            print("cpp:", "not built" in str(e) and "pip install --no-build-isolation" in str(e))
    """)
    assert code == 0, err
    assert out.split("\n")[:4] == ["1", "python", "True", "cpp: True"]


def test_info_command():
    code, out, err = run_python("import sys; from pyengine.__main__ import main; sys.exit(main(['info']))")
    assert code == 0, err
    for key in ("torch", "backends built", "CUDA architectures compiled", "CPU kernels running", "threads"):
        assert key in out

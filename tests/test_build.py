"""Properties of the compiled extension itself."""
import glob
import os
import re
import shutil
import subprocess

import pytest

import pyengine
from pyengine import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuobjdump():
    local = os.path.join(ROOT, ".tools", "nvidia", "cu13", "bin", "cuobjdump")
    return os.environ.get("PYENGINE_CUOBJDUMP") or (local if os.access(local, os.X_OK) else shutil.which("cuobjdump"))


@pytest.mark.skipif("cuda" not in pyengine.built_backends(), reason="this build has no CUDA kernels")
def test_cuda_kernels_do_not_spill_registers():
    tool = _cuobjdump()
    if tool is None:
        missing = "cuobjdump not found (pip download nvidia-cuda-cuobjdump; .ci/run fetches it into .tools/)"
        if "cuda" in os.environ.get(_backend.EXPECT_ENV, ""):  # CI built the CUDA kernels: check them
            pytest.fail(missing)
        pytest.skip(missing)
    out = subprocess.run([tool, "--dump-resource-usage", _backend._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert kernels, f"no kernels found in cuobjdump's output:\n{out[:2000]}"
    spilling = [(name, local) for name, _, _, _, local in kernels if int(local) != 0]
    assert not spilling, f"kernels using local memory (register spills): {spilling}"


# csrc/cpu sources that are not ops: the cache of large CPU outputs.
CPU_SUPPORT_SOURCES = {"allocator"}


def test_every_kernel_source_has_a_python_reference():
    """One op, one name everywhere: csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu and pyengine/ops/<op>.py."""
    cpu = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))}
    assert CPU_SUPPORT_SOURCES <= cpu, "a support source is gone: update CPU_SUPPORT_SOURCES"
    cpu = {op for op in cpu if not op.startswith("zz_")} - CPU_SUPPORT_SOURCES
    python = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "pyengine", "ops", "*.py"))}
    assert cpu <= python, f"kernels without a python reference: {cpu - python}"
    for op in cpu:
        assert hasattr(_backend.REFERENCE, f"{op}_forward") and hasattr(_backend.REFERENCE, f"{op}_backward")


def test_warnings_are_not_silenced_globally():
    """The -Wall -Wextra gate (PYENGINE_WERROR=1) must see all of our code: torch's headers are system includes,
    and the one gcc false positive in them is silenced by a pragma in csrc/cpu/vec_math.h, not by a -Wno- flag."""
    for name in ("setup.py", "CMakeLists.txt"):
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        assert "-Wall" in text and "-Wextra" in text, f"{name} lost -Wall -Wextra"
        assert not re.findall(r"-Wno-[\w-]+", text), f"{name} silences warnings globally"


# The CPU kernels' builds: one per instruction set (setup.py CPU_BUILDS), the best this CPU runs chosen at load.
_needs_cpp = pytest.mark.skipif("cpp" not in pyengine.built_backends(), reason="pyengine._C is not built")
_LEVELS = ["DEFAULT", "AVX2", "AVX512"]
_CHOICE = """
import torch, pyengine, pyengine.functional as PF
from pyengine import _C
x = torch.randn(301, 67, dtype=torch.float64, requires_grad=True)
w = torch.randn(19, 67, dtype=torch.float64, requires_grad=True)
t = torch.randint(0, 19, (301,))
ours = PF.cross_entropy(PF.tanh(PF.linear(x, w)), t)
theirs = torch.nn.functional.cross_entropy(torch.tanh(torch.nn.functional.linear(x, w)), t)
torch.testing.assert_close(ours, theirs)
for g, h in zip(torch.autograd.grad(ours, [x, w]), torch.autograd.grad(theirs, [x, w])):
    torch.testing.assert_close(g, h)
print(_C.simd_level(), torch._C._get_cpu_capability())
"""


def _run_with(env):
    return subprocess.run([__import__("sys").executable, "-c", _CHOICE], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT)


@_needs_cpp
def test_the_cpu_kernels_come_in_one_build_per_instruction_set():
    from pyengine import _build_info

    built = _backend._C.cpu_kernels_built()
    if _build_info.CPU_ARCH:  # PYENGINE_CPU_ARCH: one build, for that -march
        assert len(built) == 1
    elif os.uname().machine == "x86_64":
        assert built == _LEVELS
    chosen = _backend._C.simd_level()
    assert chosen in built
    wanted = os.environ.get("PYENGINE_CPU_CAPABILITY", "").upper() or "AVX512"
    import torch

    best = min(_LEVELS.index(torch._C._get_cpu_capability()), _LEVELS.index(wanted))
    assert chosen == max((b for b in built if _LEVELS.index(b) <= best), key=_LEVELS.index)


@_needs_cpp
@pytest.mark.parametrize("level", ["default", "avx2", "avx512"])
def test_each_build_runs_when_chosen(level):
    """PYENGINE_CPU_CAPABILITY lowers the choice (for tests, and to compare builds); the values and gradients are
    torch's whichever build runs."""
    import torch

    if _LEVELS.index(level.upper()) > _LEVELS.index(torch._C._get_cpu_capability()):
        pytest.skip(f"this CPU does not run {level.upper()} (torch runs {torch._C._get_cpu_capability()})")
    if level.upper() not in _backend._C.cpu_kernels_built():
        pytest.skip(f"this build has no {level.upper()} kernels (PYENGINE_CPU_ARCH)")
    result = _run_with({"PYENGINE_CPU_CAPABILITY": level})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == level.upper()


@_needs_cpp
def test_atens_own_choice_lowers_ours_and_a_bad_name_says_what_to_use():
    result = _run_with({"ATEN_CPU_CAPABILITY": "default", "PYENGINE_CPU_CAPABILITY": ""})
    if "DEFAULT" in _backend._C.cpu_kernels_built():
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["DEFAULT", "DEFAULT"]
    else:  # one build, for a -march above the baseline (PYENGINE_CPU_ARCH): it says so instead of crashing
        assert result.returncode != 0
        assert "rebuild without PYENGINE_CPU_ARCH for kernels that run on any x86-64 CPU" in result.stderr
    result = _run_with({"PYENGINE_CPU_CAPABILITY": "sse9"})
    assert result.returncode != 0
    assert "PYENGINE_CPU_CAPABILITY=sse9: choose default, avx2 or avx512" in result.stderr

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

"""Builds pyengine._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA torch are present.

Environment:
  PYENGINE_CUDA=1|0      force the CUDA kernels on or off (default: on when torch has CUDA and nvcc is found)
  PYENGINE_CPU_ARCH=...  build the CPU kernels once, with this -march (e.g. native: fastest on the machine that
                         builds, and only there). Default: once per x86-64 instruction set (baseline, AVX2,
                         AVX-512), the best this CPU runs chosen at load time, so one build runs on any x86-64
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default with no GPU visible: 8.0 9.0+PTX)
  PYENGINE_WERROR=1      compiler warnings are errors (the CI quality gate)
  MAX_JOBS               parallel compile jobs
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

SUPPORTED_TORCH = ">=2.11,<2.15"  # as pyproject.toml's dependencies; tested by .ci/run at both ends
NO_TORCH = f"""
pyengine compiles its kernels against the torch installed in the environment it goes into, and this build sees
no torch. Either pip built it in an isolated build environment (pip's default, which would otherwise download
a torch of its own, several GB, and build against that one), or torch is not installed.
Install torch{SUPPORTED_TORCH} first if needed, then build against it:
    pip install setuptools wheel ninja
    pip install --no-build-isolation {{target}}
(or `python -m build --no-isolation` for an sdist and a wheel). See README.md, "Install".
"""
# Commands that compile the extension; metadata and sdist commands need no torch (an sdist carries sources only).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "develop", "install", "editable_wheel", "bdist_egg"}


def _locate_cuda_home():
    """torch takes CUDA_HOME from `which nvcc` without resolving links, so an nvcc linked into /usr/local/bin
    makes it /usr/local, which holds no libcudart. Resolve the link first (or fall back to /usr/local/cuda)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_home()

try:
    import torch  # after CUDA_HOME is settled: torch.utils.cpp_extension reads it at import
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    if BUILD_COMMANDS & set(sys.argv[1:]):
        sys.exit(NO_TORCH.format(target="." if os.path.exists(".git") else "<the pyengine sdist or checkout>"))
    torch = None

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    flag = os.environ.get("PYENGINE_CUDA", "").strip()
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1" and not have:
        raise RuntimeError(
            "PYENGINE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} has CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}. "
            "Install a CUDA build of torch and a CUDA toolkit (nvcc), or unset PYENGINE_CUDA."
        )
    return have


# The CPU kernels (csrc/cpu/*.cpp but the output cache, allocator.cpp) are compiled once per instruction set, as
# ATen compiles its own, with ATen's names and flags; each build's code lives in its own namespace, the name
# `pyengine` renamed pyengine_<CAPABILITY> for those sources, so one library holds all of them and
# csrc/cpu_capability.cpp chooses one at run time. The lowest build's objects link first, so that where builds
# share an inline function of torch's headers (one symbol for all), the copy the library keeps is the lowest's.
CPU_BUILDS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}
KERNEL_SOURCES = sorted(set(glob.glob("csrc/cpu/*.cpp")) - {"csrc/cpu/allocator.cpp"})


def cpu_builds():
    """(the -march asked for, {capability: flags}) of the builds of the CPU kernels."""
    march = os.environ.get("PYENGINE_CPU_ARCH", "").strip()
    if march:
        return march, {cpu_capability(march): [f"-march={march}"]}
    return "", CPU_BUILDS if os.uname().machine == "x86_64" else {"DEFAULT": []}


def cpu_build_flags(capability, flags):
    return flags + [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
                    f"-Dpyengine=pyengine_{capability}"]


def cpu_dispatch_flags(builds):
    """What the rest of the library (csrc/route.h, csrc/cpu_capability.cpp) knows of the builds."""
    return [f"-DPYENGINE_CPU_KERNELS_HAVE_{c}" for c in builds] + [
        f"-DPYENGINE_CPU_KERNELS_LOWEST=pyengine_{next(iter(builds))}"]


def cpu_capability(march):
    """The at::vec capability the compiler will target with -march=<march>: AVX512, AVX2 or DEFAULT."""
    cmd = ["c++", "-dM", "-E", "-x", "c++", "-"] + ([f"-march={march}"] if march else [])
    try:
        macros = subprocess.run(cmd, input="", capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "DEFAULT"
    if all(f"__{f}__" in macros for f in ("AVX512F", "AVX512BW", "AVX512VL", "AVX512DQ", "FMA")):
        return "AVX512"
    if "__AVX2__" in macros and "__FMA__" in macros:
        return "AVX2"
    return "DEFAULT"


def cuda_header_flags():
    """torch's CUDA headers include cuBLAS/cuSPARSE, which a bare toolkit may lack; pip-installed torch carries
    them in nvidia/cu<N>/include. Searched as system dirs, after the toolkit's own headers (-I), so the
    toolkit's runtime headers win wherever both have a file."""
    dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu[0-9]*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "cublas", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "cusparse", "include")))
    except ImportError:
        pass
    return [flag for d in dirs for flag in ("-isystem", d)]


def torch_system_include_flags():
    """torch's headers as system headers, so that -Wall -Wextra report our code only (gcc drops the -I that
    CppExtension also passes for a directory given with -isystem)."""
    from torch.utils.cpp_extension import include_paths

    return [flag for d in include_paths() for flag in ("-isystem", d)]


def warning_flags():
    """-Wall -Wextra on our C++ and on the host code nvcc generates, plus nvcc's own warnings. PYENGINE_WERROR=1
    (set by .ci/setup) turns every warning into an error: the quality gate."""
    werror = os.environ.get("PYENGINE_WERROR", "").strip() == "1"
    cxx = ["-Wall", "-Wextra"] + (["-Werror"] if werror else [])
    nvcc = ["-Xcompiler=-Wall,-Wextra"] + (["-Werror=all-warnings", "-Xcompiler=-Werror"] if werror else [])
    return {"cxx": cxx, "nvcc": nvcc}


def write_build_info(**info):
    """pyengine/_build_info.py records how _C was built, for `python -m pyengine info`."""
    with open(os.path.join(ROOT, "pyengine", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py at build time."""\n')
        for key, value in info.items():
            f.write(f"{key.upper()} = {value!r}\n")


def extension():
    march, builds = cpu_builds()
    # cpu/vec_math.h ahead of every C++ source: its pragma must see torch's vec headers first (see the header)
    cxx = ["-O3", "-fopenmp", "-include", "cpu/vec_math.h"] + warning_flags()["cxx"] + torch_system_include_flags()
    cxx += cpu_dispatch_flags(builds)
    sources = sorted(glob.glob("csrc/*.cpp")) + ["csrc/cpu/allocator.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    info = dict(torch_version=torch.__version__, cpu_arch=march, cpu_builds=list(builds), cuda_archs="")
    if not want_cuda():
        write_build_info(**info)
        ext = CppExtension("pyengine._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        ext.cpu_builds = builds
        return ext
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0 9.0+PTX"  # no GPU to ask: Ampere, Hopper, PTX for newer
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        os.environ["TORCH_CUDA_ARCH_LIST"] = " ".join(f"{a}.{b}" for a, b in sorted(caps))
    info.update(cuda_version=torch.version.cuda, cuda_archs=os.environ["TORCH_CUDA_ARCH_LIST"])
    write_build_info(**info)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills", "-DPYENGINE_WITH_CUDA"]
    nvcc += warning_flags()["nvcc"] + torch_system_include_flags()
    ext = CUDAExtension(
        "pyengine._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + cuda_header_flags() + ["-DPYENGINE_WITH_CUDA"],
                            "nvcc": nvcc + cuda_header_flags()},
        extra_link_args=["-fopenmp"],
    )
    ext.cpu_builds = builds
    return ext


if torch is not None:
    class BuildWithCpuBuilds(BuildExtension):
        """torch's BuildExtension, which first compiles the CPU kernels once per build in ext.cpu_builds (each
        into its own folder of objects), for the extension to link after its own sources, the lowest build
        first."""

        def build_extension(self, ext):
            builds = getattr(ext, "cpu_builds", None)
            if builds:
                base = ext.extra_compile_args["cxx"]
                objects = []
                for capability, flags in builds.items():
                    objects += self.compiler.compile(
                        KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, f"cpu_{capability}"),
                        include_dirs=ext.include_dirs,
                        extra_postargs={"cxx": base + cpu_build_flags(capability, flags), "nvcc": []})
                ext.extra_objects = objects
            super().build_extension(ext)


setup(
    # benchmarks/ ships inside the package as pyengine.benchmarks, so `pyengine bench` runs after any install
    packages=find_packages(include=["pyengine", "pyengine.*"]) + ["pyengine.benchmarks"],
    package_dir={"pyengine.benchmarks": "benchmarks"},
    ext_modules=[extension()] if torch is not None else [],
    cmdclass={"build_ext": BuildWithCpuBuilds.with_options(use_ninja=True)} if torch is not None else {},
)

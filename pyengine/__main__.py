"""Command line: `python -m pyengine info | bench | train ...` (also installed as the `pyengine` script)."""
import argparse
import importlib
import os
import platform
import sys

import torch


def _benchmarks():
    """The benchmark definitions: installed as pyengine.benchmarks, or benchmarks/ beside a source checkout."""
    try:
        return importlib.import_module("pyengine.benchmarks")
    except ImportError as missing:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(root, "benchmarks")):
            raise SystemExit("pyengine bench: the benchmarks are not installed; run it from a pyengine checkout "
                             "after `pip install --no-build-isolation -e .`") from missing
        sys.path.insert(0, root)
        return importlib.import_module("benchmarks")


def _cpu_kernels(c, build):
    """Which build of the CPU kernels runs, of which were built, and what chose it."""
    if c is None:
        return "n/a (extension not built)"
    built = c.cpu_kernels_built()
    how = (f"the only build: PYENGINE_CPU_ARCH={build.get('CPU_ARCH')} at build time" if len(built) == 1 else
           f"chosen at load from {', '.join(built)}: the best this CPU runs, lowered by PYENGINE_CPU_CAPABILITY "
           "or ATEN_CPU_CAPABILITY")
    return f"{c.simd_level()} ({how})"


def info(check=False):
    from . import _backend

    c = _backend._C
    try:
        from . import _build_info

        build = vars(_build_info)
    except ImportError:
        build = {}
    lines = [
        ("pyengine", sys.modules["pyengine"].__version__),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("python", platform.python_version()),
        ("backends built", ", ".join(_backend.built_backends())),
        ("backends available", ", ".join(_backend.available_backends())),
        ("default backend", _backend.current_backend() or "by device (cpu: %s, cuda: %s)"
         % (_backend._default("cpu"), _backend._default("cuda"))),
        ("CPU", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"),
        ("CPU kernels running", _cpu_kernels(c, build)),
        ("CUDA architectures compiled", build.get("CUDA_ARCHS") or "none"),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"),
    ]
    if c is None:
        lines.append(("extension import error", str(_backend._C_IMPORT_ERROR)))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    if not check:
        return 0
    problems = [f"backend {name!r} is expected ({_backend.EXPECT_ENV}) but not built: {why}"
                for name, why in _backend.missing_expected_backends()]
    if c is None and not problems:
        problems.append(f"the compiled extension pyengine._C does not import ({_backend._C_IMPORT_ERROR})")
    for p in problems:
        print(f"pyengine info --check: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pyengine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="torch version, backends built, CUDA architectures, CPU threads and "
                                              "SIMD level")
    info_parser.add_argument("--check", action="store_true",
                             help="exit 1 when pyengine._C does not import, or a backend named in "
                                  "PYENGINE_EXPECT_BACKENDS (e.g. cpp,cuda) is not built")
    sub.add_parser("bench", help="benchmark every op against native torch (see --help)", add_help=False)
    sub.add_parser("train", help="train the origin notes' models on pyengine (see --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info(args.check)
    if args.command == "bench":
        return _benchmarks().main(rest)
    if args.command == "train":
        from . import train

        return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())

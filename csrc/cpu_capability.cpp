// Which build of the CPU kernels runs here. setup.py (and CMakeLists.txt) compile csrc/cpu/*.cpp once per x86-64
// instruction set, as ATen does its own kernels: DEFAULT (the x86-64 baseline), AVX2 (with FMA and F16C) and
// AVX512 (F, BW, VL, DQ), each build in its own namespace pyengine_<CAPABILITY> so that one library holds all of
// them. The one chosen at the first call: the best build at most ATen's own choice for this CPU
// (at::get_cpu_capability(), which the environment variable ATEN_CPU_CAPABILITY lowers for torch too),
// and at most PYENGINE_CPU_CAPABILITY (default, avx2, avx512) when that is set: the way to run, and test, a
// lower build on a machine that has a higher one.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "route.h"

namespace pyengine {
namespace {

const char* const kNames[] = {"DEFAULT", "AVX2", "AVX512"};

std::vector<CpuKernels> built() {
  std::vector<CpuKernels> kinds;
#ifdef PYENGINE_CPU_KERNELS_HAVE_DEFAULT
  kinds.push_back(CpuKernels::DEFAULT);
#endif
#ifdef PYENGINE_CPU_KERNELS_HAVE_AVX2
  kinds.push_back(CpuKernels::AVX2);
#endif
#ifdef PYENGINE_CPU_KERNELS_HAVE_AVX512
  kinds.push_back(CpuKernels::AVX512);
#endif
  return kinds;
}

// ATen's name of the instruction set it runs ("DEFAULT", "AVX2", "AVX512"; other machines' names count as DEFAULT).
int level_of(const std::string& aten) {
  const auto* found = std::find(std::begin(kNames), std::end(kNames), aten);
  return found == std::end(kNames) ? 0 : static_cast<int>(found - std::begin(kNames));
}

CpuKernels choose() {
  int level = level_of(at::get_cpu_capability());
  if (const char* wanted = std::getenv("PYENGINE_CPU_CAPABILITY"); wanted != nullptr && *wanted != '\0') {
    std::string name(wanted);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::toupper(c); });
    const auto* found = std::find(std::begin(kNames), std::end(kNames), name);
    TORCH_CHECK(found != std::end(kNames), "PYENGINE_CPU_CAPABILITY=", wanted,
                ": choose default, avx2 or avx512 (or unset it to take the best this CPU runs)");
    level = std::min(level, static_cast<int>(found - std::begin(kNames)));
  }
  const std::vector<CpuKernels> kinds = built();
  for (auto it = kinds.rbegin(); it != kinds.rend(); ++it) {
    if (static_cast<int>(*it) <= level) return *it;
  }
  TORCH_CHECK(false, "pyengine's CPU kernels were built for ", kNames[static_cast<int>(kinds.front())],
              " only (PYENGINE_CPU_ARCH at build time), and this CPU runs ", kNames[level],
              ": rebuild without PYENGINE_CPU_ARCH for kernels that run on any x86-64 CPU");
}

}  // namespace

CpuKernels cpu_kernels() {
  static const CpuKernels chosen = choose();
  return chosen;
}

std::string cpu_kernels_name() { return kNames[static_cast<int>(cpu_kernels())]; }

std::vector<std::string> cpu_kernels_built() {
  std::vector<std::string> names;
  for (CpuKernels kind : built()) names.emplace_back(kNames[static_cast<int>(kind)]);
  return names;
}

}  // namespace pyengine

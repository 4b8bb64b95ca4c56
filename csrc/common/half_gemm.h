// Whether a float16/bfloat16 matrix product runs faster in its own dtype than widened to float32, on the device
// of a tensor. Both ways accumulate in float32 (cuBLAS and oneDNN multiply half types into float sums); the
// half-precision product rounds its output to the dtype, which torch's own product does too.
//   CUDA: always (tensor cores, or at worst the same rate as float32 with half the bytes).
//   CPU:  where oneDNN has dot-product instructions for the dtype: avx512_bf16 or AMX for bfloat16, avx512_fp16 or
//         AMX-FP16 for float16. Elsewhere torch emulates them (this AMD EPYC, float16: 1024x512 @ 512x8000 in
//         1.75 s against 0.46 s in float32), and at::mm goes through oneDNN only while torch.backends.mkldnn
//         is enabled.
// PYENGINE_HALF_GEMM=on or off (read at each call) overrides the choice, so that tests run both ways on any one
// machine; unset or auto: as above.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/Utils.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace pyengine {

// torch's cpuinfo reading of this CPU: features by name, and its "cpu_name".
inline const c10::IValue* cpu_capability(const std::string& name) {
  static const auto capabilities = at::cpu::get_cpu_capabilities();
  const auto found = capabilities.find(name);
  return found == capabilities.end() ? nullptr : &found->second;
}

inline bool cpu_has_feature(const std::string& name) {
  const c10::IValue* v = cpu_capability(name);
  return v != nullptr && v->isBool() && v->toBool();
}

// Whether cpuinfo names this CPU as one of Intel's (MKL's sgemm runs at its best there).
inline bool cpu_is_intel() {
  static const bool intel = [] {
    const c10::IValue* v = cpu_capability("cpu_name");
    return v != nullptr && v->isString() && v->toStringRef().rfind("Intel", 0) == 0;
  }();
  return intel;
}

// Whether this CPU has oneDNN's dot-product instructions for the half dtype t (the CPU rule above).
inline bool cpu_fast_half(at::ScalarType t) {
  static const bool bf16 = cpu_has_feature("avx512_bf16") || cpu_has_feature("amx_bf16");
  static const bool fp16 = cpu_has_feature("avx512_fp16") || cpu_has_feature("amx_fp16");
  return t == at::kBFloat16 ? bf16 : t == at::kHalf ? fp16 : false;
}

inline bool fast_half_gemm(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16) return false;
  const char* forced = std::getenv("PYENGINE_HALF_GEMM");
  if (forced != nullptr && std::strcmp(forced, "on") == 0) return true;
  if (forced != nullptr && std::strcmp(forced, "off") == 0) return false;
  TORCH_CHECK(forced == nullptr || *forced == '\0' || std::strcmp(forced, "auto") == 0, "PYENGINE_HALF_GEMM=", forced,
              ": choose on, off or auto (or unset it)");
  if (x.is_cuda()) return true;
  return x.is_cpu() && at::globalContext().userEnabledMkldnn() && cpu_fast_half(t);
}

// A float16/bfloat16 x whose products run faster widened to float32 (rounded to the dtype once at the end).
inline bool half_gemm_widens(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) && !fast_half_gemm(x);
}

}  // namespace pyengine

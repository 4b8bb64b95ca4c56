// Input checks shared by every kernel entry point, so each function states its contract in a line or two:
//   check(x, "input", "linear_forward").floating().dim(2).same_device(w);
// Failures raise c10::Error, which pybind11 turns into a Python RuntimeError (ValueError/IndexError where
// the TORCH_CHECK_* variant says so) with the op and argument named.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common/activation.h"

namespace pyengine {

class TensorCheck {
 public:
  TensorCheck(const at::Tensor& t, const char* name, const char* op) : t_(t), name_(name), op_(op) {
    TORCH_CHECK(t_.defined(), op_, ": ", name_, " is an undefined tensor");
  }

  TensorCheck& floating() {
    TORCH_CHECK(at::isFloatingType(t_.scalar_type()), op_, ": ", name_,
                " must be a floating-point tensor (float64, float32, float16 or bfloat16), got ", t_.scalar_type());
    return *this;
  }
  TensorCheck& dtype(at::ScalarType s) {
    TORCH_CHECK(t_.scalar_type() == s, op_, ": ", name_, " must have dtype ", s, ", got ", t_.scalar_type());
    return *this;
  }
  TensorCheck& dim(int64_t d) {
    TORCH_CHECK(t_.dim() == d, op_, ": ", name_, " must be ", d, "-D, got shape ", t_.sizes());
    return *this;
  }
  TensorCheck& sizes(at::IntArrayRef expected) {
    TORCH_CHECK(t_.sizes() == expected, op_, ": ", name_, " must have shape ", expected, ", got ", t_.sizes());
    return *this;
  }
  TensorCheck& contiguous() {
    TORCH_CHECK(t_.is_contiguous(), op_, ": ", name_, " must be contiguous");
    return *this;
  }
  TensorCheck& cpu() {
    TORCH_CHECK(t_.device().is_cpu(), op_, ": ", name_, " must be a CPU tensor, got ", t_.device());
    return *this;
  }
  TensorCheck& cuda() {
    TORCH_CHECK(t_.device().is_cuda(), op_, ": ", name_, " must be a CUDA tensor, got ", t_.device());
    return *this;
  }
  TensorCheck& same_device(const at::Tensor& other) {
    TORCH_CHECK(t_.device() == other.device(), op_, ": ", name_, " is on ", t_.device(),
                " but the other operands are on ", other.device());
    return *this;
  }
  TensorCheck& same_dtype(const at::Tensor& other) {
    TORCH_CHECK(t_.scalar_type() == other.scalar_type(), op_, ": ", name_, " has dtype ", t_.scalar_type(),
                " but the other operands have ", other.scalar_type());
    return *this;
  }

 private:
  const at::Tensor& t_;
  const char* name_;
  const char* op_;
};

inline TensorCheck check(const at::Tensor& t, const char* name, const char* op) { return TensorCheck(t, name, op); }

// Reductions of the cross-entropy loss, numbered as torch's at::Reduction.
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

inline Reduction check_reduction(int64_t r, const char* op) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", r);
  return static_cast<Reduction>(r);
}

inline Activation check_activation(int64_t a, const char* op) {
  TORCH_CHECK_VALUE(a >= 0 && a <= 2, op, ": activation must be 0 (none), 1 (relu) or 2 (sigmoid), got ", a);
  return static_cast<Activation>(a);
}

}  // namespace pyengine

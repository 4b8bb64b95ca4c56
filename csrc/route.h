// Each op routed to its CPU or CUDA kernel by the device of its first tensor: the entry points that
// bindings.cpp exposes to Python and that autograd.cpp's Functions call. pyengine/_backend.py picks which backend
// runs; this file only routes.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "ops.h"

namespace pyengine {

inline bool on_cuda(const at::Tensor& t, const char* op) {
  const auto dev = t.device();
  TORCH_CHECK(dev.is_cpu() || dev.is_cuda(), op, ": pyengine runs on CPU and CUDA tensors, got ", dev);
#ifndef PYENGINE_WITH_CUDA
  TORCH_CHECK(!dev.is_cuda(), op, ": this build of pyengine has no CUDA kernels. Rebuild on a machine with ",
              "a CUDA toolkit and a CUDA build of torch (PYENGINE_CUDA=1 pip install --no-build-isolation .), ",
              "or use the python backend.");
#endif
  return dev.is_cuda();
}

// The CPU kernels, built once per instruction set (setup.py: DEFAULT, AVX2 and AVX512, or the one
// PYENGINE_CPU_ARCH names), each in its namespace pyengine_<CAPABILITY>; cpu_kernels() is the build that runs
// here, chosen at the first call (csrc/cpu_capability.cpp). PYENGINE_CPU_KERNELS_LOWEST names the lowest build
// and PYENGINE_CPU_KERNELS_HAVE_<CAPABILITY> each one built.
enum class CpuKernels { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
CpuKernels cpu_kernels();
std::string cpu_kernels_name();
std::vector<std::string> cpu_kernels_built();

}  // namespace pyengine

#ifdef PYENGINE_CPU_KERNELS_HAVE_DEFAULT
namespace pyengine_DEFAULT {
PYENGINE_ALL_OPS(cpu)
PYENGINE_CPU_ONLY_OPS
}  // namespace pyengine_DEFAULT
#endif
#ifdef PYENGINE_CPU_KERNELS_HAVE_AVX2
namespace pyengine_AVX2 {
PYENGINE_ALL_OPS(cpu)
PYENGINE_CPU_ONLY_OPS
}  // namespace pyengine_AVX2
#define PE_CPU_CASE_AVX2(...) \
  case CpuKernels::AVX2:      \
    __VA_ARGS__
#else
#define PE_CPU_CASE_AVX2(...)
#endif
#ifdef PYENGINE_CPU_KERNELS_HAVE_AVX512
namespace pyengine_AVX512 {
PYENGINE_ALL_OPS(cpu)
PYENGINE_CPU_ONLY_OPS
}  // namespace pyengine_AVX512
#define PE_CPU_CASE_AVX512(...) \
  case CpuKernels::AVX512:      \
    __VA_ARGS__
#else
#define PE_CPU_CASE_AVX512(...)
#endif

namespace pyengine {

// fn's CPU kernel from the build chosen for this CPU (the lowest build where no higher one is chosen).
#define PE_CPU_CALL(fn, ...)                                                 \
  switch (cpu_kernels()) {                                                   \
    PE_CPU_CASE_AVX512(return ::pyengine_AVX512::fn##_cpu(__VA_ARGS__);)     \
    PE_CPU_CASE_AVX2(return ::pyengine_AVX2::fn##_cpu(__VA_ARGS__);)         \
    default:                                                                 \
      return ::PYENGINE_CPU_KERNELS_LOWEST::fn##_cpu(__VA_ARGS__);           \
  }

#ifdef PYENGINE_WITH_CUDA
#define PE_ROUTE(t, fn, ...)                                  \
  if (on_cuda(t, #fn)) return fn##_cuda(__VA_ARGS__);         \
  PE_CPU_CALL(fn, __VA_ARGS__)
#else
#define PE_ROUTE(t, fn, ...) \
  on_cuda(t, #fn);           \
  PE_CPU_CALL(fn, __VA_ARGS__)
#endif

using OptTensor = c10::optional<at::Tensor>;

inline at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                 int64_t activation) {
  PE_ROUTE(x, linear_forward, x, weight, bias, activation);
}
inline std::vector<at::Tensor> linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                               bool need_x, bool need_weight, bool need_bias, int64_t activation,
                                               const OptTensor& y) {
  PE_ROUTE(grad_y, linear_backward, grad_y, x, weight, need_x, need_weight, need_bias, activation, y);
}

inline at::Tensor relu_forward(const at::Tensor& x) { PE_ROUTE(x, relu_forward, x); }
inline at::Tensor relu_backward(const at::Tensor& grad_y, const at::Tensor& y) {
  PE_ROUTE(y, relu_backward, grad_y, y);
}
inline at::Tensor sigmoid_forward(const at::Tensor& x) { PE_ROUTE(x, sigmoid_forward, x); }
inline at::Tensor sigmoid_backward(const at::Tensor& grad_y, const at::Tensor& y) {
  PE_ROUTE(y, sigmoid_backward, grad_y, y);
}

inline at::Tensor add_forward(const at::Tensor& input, const at::Tensor& other, const at::Scalar& alpha) {
  PE_ROUTE(input, add_forward, input, other, alpha);
}
inline at::Tensor add_backward(const at::Tensor& grad, at::IntArrayRef shape, const at::Scalar& scale) {
  PE_ROUTE(grad, add_backward, grad, shape, scale);
}

inline std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& target,
                                                     const OptTensor& weight, int64_t ignore_index, int64_t reduction,
                                                     double label_smoothing) {
  PE_ROUTE(logits, cross_entropy_forward, logits, target, weight, ignore_index, reduction, label_smoothing);
}
inline at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                         const at::Tensor& target, const OptTensor& weight, const at::Tensor& lse,
                                         const at::Tensor& denom, int64_t ignore_index, int64_t reduction,
                                         double label_smoothing) {
  PE_ROUTE(logits, cross_entropy_backward, grad_loss, logits, target, weight, lse, denom, ignore_index, reduction,
           label_smoothing);
}

inline at::Tensor tanh_forward(const at::Tensor& x) { PE_ROUTE(x, tanh_forward, x); }
inline at::Tensor tanh_backward(const at::Tensor& grad_y, const at::Tensor& y) {
  PE_ROUTE(y, tanh_backward, grad_y, y);
}
inline at::Tensor leaky_relu_forward(const at::Tensor& x, double slope) { PE_ROUTE(x, leaky_relu_forward, x, slope); }
inline at::Tensor leaky_relu_backward(const at::Tensor& grad_y, const at::Tensor& x, double slope) {
  PE_ROUTE(x, leaky_relu_backward, grad_y, x, slope);
}

inline at::Tensor mse_loss_forward(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  PE_ROUTE(input, mse_loss_forward, input, target, reduction);
}
inline std::vector<at::Tensor> mse_loss_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                                                 const at::Tensor& target, int64_t reduction, bool need_input,
                                                 bool need_target) {
  PE_ROUTE(input, mse_loss_backward, grad_loss, input, target, reduction, need_input, need_target);
}
inline std::vector<at::Tensor> mse_loss_forward_with_grad(const at::Tensor& input, const at::Tensor& target,
                                                          int64_t reduction) {
  PE_ROUTE(input, mse_loss_forward_with_grad, input, target, reduction);
}

inline at::Tensor binary_cross_entropy_with_logits_forward(const at::Tensor& input, const at::Tensor& target,
                                                           const OptTensor& weight, const OptTensor& pos_weight,
                                                           int64_t reduction) {
  PE_ROUTE(input, binary_cross_entropy_with_logits_forward, input, target, weight, pos_weight, reduction);
}
inline std::vector<at::Tensor> binary_cross_entropy_with_logits_backward(const at::Tensor& grad_loss,
                                                                         const at::Tensor& input,
                                                                         const at::Tensor& target,
                                                                         const OptTensor& weight,
                                                                         const OptTensor& pos_weight, int64_t reduction,
                                                                         bool need_input, bool need_target) {
  PE_ROUTE(input, binary_cross_entropy_with_logits_backward, grad_loss, input, target, weight, pos_weight, reduction,
           need_input, need_target);
}
inline std::vector<at::Tensor> binary_cross_entropy_with_logits_forward_with_grad(const at::Tensor& input,
                                                                                  const at::Tensor& target,
                                                                                  const OptTensor& weight,
                                                                                  const OptTensor& pos_weight,
                                                                                  int64_t reduction) {
  PE_ROUTE(input, binary_cross_entropy_with_logits_forward_with_grad, input, target, weight, pos_weight, reduction);
}

using TensorList = std::vector<at::Tensor>;

inline TensorList fused_mlp_forward(const at::Tensor& x, const TensorList& weights, const TensorList& biases,
                                    int64_t activation, int64_t output_activation) {
  PE_ROUTE(x, fused_mlp_forward, x, weights, biases, activation, output_activation);
}
inline TensorList fused_mlp_backward(const at::Tensor& grad_y, const at::Tensor& x, const TensorList& weights,
                                     const TensorList& hidden, const at::Tensor& y, int64_t activation,
                                     int64_t output_activation, bool need_x, bool need_weights, bool need_biases) {
  PE_ROUTE(x, fused_mlp_backward, grad_y, x, weights, hidden, y, activation, output_activation, need_x,
           need_weights, need_biases);
}

inline std::vector<at::Tensor> linear_cross_entropy_forward(const at::Tensor& x, const at::Tensor& weight,
                                                            const OptTensor& bias, const at::Tensor& target,
                                                            int64_t ignore_index, int64_t reduction,
                                                            double label_smoothing, bool need_x, bool need_weight,
                                                            bool need_bias, int64_t chunk_bytes) {
  PE_ROUTE(x, linear_cross_entropy_forward, x, weight, bias, target, ignore_index, reduction, label_smoothing, need_x,
           need_weight, need_bias, chunk_bytes);
}
inline std::vector<at::Tensor> linear_cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& x,
                                                             const at::Tensor& weight, const OptTensor& bias,
                                                             const at::Tensor& target, const at::Tensor& lse,
                                                             int64_t ignore_index, double label_smoothing, bool need_x,
                                                             bool need_weight, bool need_bias, int64_t chunk_bytes) {
  PE_ROUTE(x, linear_cross_entropy_backward, grad_loss, x, weight, bias, target, lse, ignore_index, label_smoothing,
           need_x, need_weight, need_bias, chunk_bytes);
}

inline std::vector<at::Tensor> cross_entropy_forward_with_grad(const at::Tensor& logits, const at::Tensor& target,
                                                               const OptTensor& weight, int64_t ignore_index,
                                                               int64_t reduction, double label_smoothing) {
  PE_ROUTE(logits, cross_entropy_forward_with_grad, logits, target, weight, ignore_index, reduction, label_smoothing);
}

// FusedMLP's training step: CPU only (the CUDA path composes kernels in autograd_fused_mlp.cpp).
inline std::vector<at::Tensor> fused_mlp_training_step_on_cpu(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                                              const std::vector<at::Tensor>& biases,
                                                              int64_t activation, int64_t output_activation,
                                                              const at::Tensor& target, int64_t loss) {
  PE_CPU_CALL(fused_mlp_training_step, x, weights, biases, activation, output_activation, target, loss);
}

}  // namespace pyengine

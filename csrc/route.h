// Each op routed to its CPU or CUDA kernel by the device of its first tensor: the entry points that
// bindings.cpp exposes to Python and that autograd.cpp's Functions call. pyengine/_backend.py picks which backend
// runs; this file only routes.
#pragma once

#include <ATen/core/Tensor.h>

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

#ifdef PYENGINE_WITH_CUDA
#define PE_ROUTE(t, fn, ...) return on_cuda(t, #fn) ? fn##_cuda(__VA_ARGS__) : fn##_cpu(__VA_ARGS__)
#else
#define PE_ROUTE(t, fn, ...) \
  on_cuda(t, #fn);           \
  return fn##_cpu(__VA_ARGS__)
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

}  // namespace pyengine

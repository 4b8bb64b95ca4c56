// fused_mlp's contract, shared by the CPU and CUDA kernels: the activation codes, the per-element activation
// and its derivative (from the output), and the host-side checks of the network's shapes.
//
// Network: widths n_0 .. n_L (each 1..kMaxWidth), layer l has weight W_l (n_{l+1}, n_l) and bias b_l (n_{l+1}):
//   a_0 = x,  z_l = a_l W_l^T + b_l,  a_{l+1} = act(z_l) for l < L - 1,  y = out_act(z_{L-1})
// The hidden outputs a_1 .. a_{L-1} are saved, so the backward needs no recomputation:
//   dz_{L-1} = dy * out_act'(y);  dW_l = dz_l^T a_l;  db_l = sum_rows dz_l;  da_l = dz_l W_l;
//   dz_{l-1} = da_l * act'(a_l);  dx = da_0
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/checks.h"
#include "common/math.h"

namespace pyengine {
namespace fused_mlp {

// The widest layer whose activations a block of rows keeps on chip; wider networks belong to pyengine.nn.Linear.
constexpr int64_t kMaxWidth = 128;
// The deepest network: the CUDA kernels take the layer table as a kernel argument of fixed size.
constexpr int64_t kMaxLayers = 16;

enum Activation : int64_t { kNone = 0, kRelu = 1, kSigmoid = 2 };

// T is a scalar or, on the CPU, an at::vec::Vectorized (the math.h formulas work on both).
template <typename T> PE_HD T activate(T z, int64_t act) {
  if (act == kRelu) return relu_forward_math(z);
  if (act == kSigmoid) return sigmoid_forward_math(z);
  return z;
}

// dz from da and the activation's saved output a: relu' = (a > 0), sigmoid' = a (1 - a).
template <typename T> PE_HD T activation_grad(T da, T a, int64_t act) {
  if (act == kRelu) return relu_backward_math(da, a);
  if (act == kSigmoid) return sigmoid_backward_math(da, a);
  return da;
}

inline void check_activation(int64_t act, const char* name, const char* op) {
  TORCH_CHECK_VALUE(act == kNone || act == kRelu || act == kSigmoid, op, ": ", name,
                    " must be 0 (none), 1 (relu) or 2 (sigmoid), got ", act);
}

// Checks x (M, n_0) and the weights; returns the widths n_0 .. n_L.
inline std::vector<int64_t> check_network(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                          const char* op) {
  check(x, "x", op).floating().dim(2);
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(layers >= 1 && layers <= kMaxLayers, op, ": takes 1 to ", kMaxLayers, " layers, got ", layers);
  std::vector<int64_t> widths{x.size(1)};
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& w = weights[l];
    check(w, "weight", op).dim(2).same_device(x).same_dtype(x);
    TORCH_CHECK(w.size(1) == widths.back(), op, ": layer ", l, " weight has shape ", w.sizes(), " but its input has ",
                widths.back(), " features");
    widths.push_back(w.size(0));
  }
  for (int64_t n : widths) {
    TORCH_CHECK_VALUE(n >= 1 && n <= kMaxWidth, op, ": every width must be 1 to ", kMaxWidth, ", got widths ",
                      at::IntArrayRef(widths), "; use pyengine.nn.Linear layers for wider networks");
  }
  return widths;
}

inline void check_biases(const at::Tensor& x, const std::vector<at::Tensor>& biases,
                         const std::vector<int64_t>& widths, const char* op) {
  TORCH_CHECK_VALUE(biases.size() + 1 == widths.size(), op, ": one bias per weight, got ", biases.size(),
                    " biases for ", widths.size() - 1, " weights");
  for (size_t l = 0; l < biases.size(); ++l) {
    check(biases[l], "bias", op).same_device(x).same_dtype(x).sizes({widths[l + 1]});
  }
}

// The checks of a call that takes the whole network (x, weights, biases, both activation codes); the widths.
inline std::vector<int64_t> check_network_call(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                               const std::vector<at::Tensor>& biases, int64_t activation,
                                               int64_t output_activation, const char* op) {
  std::vector<int64_t> widths = check_network(x, weights, op);
  check_biases(x, biases, widths, op);
  check_activation(activation, "activation", op);
  check_activation(output_activation, "output_activation", op);
  return widths;
}

}  // namespace fused_mlp
}  // namespace pyengine

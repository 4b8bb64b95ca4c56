// The autograd of the compiled backends, in C++ (autograd.cpp): one call builds the same graph node as the
// Python Function of pyengine/ops/<op>.py, for the arguments that Function takes after the functional form has
// checked, promoted and broadcast them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <pybind11/pybind11.h>

#include <vector>

namespace pyengine {
namespace autograd {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  int64_t activation);
at::Tensor relu(const at::Tensor& x);
at::Tensor sigmoid(const at::Tensor& x);
at::Tensor tanh(const at::Tensor& x);
at::Tensor leaky_relu(const at::Tensor& x, double negative_slope);
at::Tensor add(const at::Tensor& input, const at::Tensor& other, double alpha);
at::Tensor mse_loss(const at::Tensor& input, const at::Tensor& target, int64_t reduction);
at::Tensor binary_cross_entropy_with_logits(const at::Tensor& input, const at::Tensor& target,
                                            const c10::optional<at::Tensor>& weight,
                                            const c10::optional<at::Tensor>& pos_weight, int64_t reduction);
// logits (N, C) and int64 class indices (N); the functional form sends every other case to its Python Function.
at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                         int64_t ignore_index, int64_t reduction, double label_smoothing);
// x (N, H), weight (V, H), bias (V) or none, int64 class indices (N); chunk_bytes: the logits budget of a chunk.
at::Tensor linear_cross_entropy(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& target, int64_t ignore_index, int64_t reduction,
                                double label_smoothing, int64_t chunk_bytes);
// The whole MLP, its parameters as lists or packed in one tensor (per layer W_l row-major, then b_l).
at::Tensor fused_mlp(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                     const std::vector<at::Tensor>& biases, int64_t activation, int64_t output_activation);
at::Tensor fused_mlp_packed(const at::Tensor& x, const at::Tensor& params, const std::vector<int64_t>& widths,
                            int64_t activation, int64_t output_activation);
// FusedMLP's training step: forward, mean loss, backward and params -= lr * grad in one call, no graph.
at::Tensor fused_mlp_training_step(const at::Tensor& x, const at::Tensor& params, const std::vector<int64_t>& widths,
                                   int64_t activation, int64_t output_activation, const at::Tensor& target,
                                   int64_t loss, double lr);

// Names the graph nodes of the C++ Functions as the Python Functions' nodes are named (ReLUFunctionBackward, ...).
void name_graph_nodes();

// The python backend's kernels (pyengine._backend.REFERENCE), which a backward runs while autograd records it.
void set_reference(pybind11::object kernels);

}  // namespace autograd
}  // namespace pyengine

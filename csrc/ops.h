// Every kernel entry point, CPU and CUDA. bindings.cpp routes each op to the one that matches its tensors'
// device. Shapes are the kernels' own contract: the Python layer (pyengine/ops/*.py) reshapes user inputs
// (leading batch dims, 1-D input, (N, C, d1, ..., dk) logits) into them and applies type promotion.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <c10/util/Optional.h>

#include <vector>

namespace pyengine {

// linear: x (M, K), weight (N, K), bias (N) -> y (M, N) = act(x @ weight^T + bias)
// activation: 0 none, 1 relu, 2 sigmoid (common/math.h Activation); with one, the backward takes the saved
// output y (M, N) and works from dz = dy * act'(y).
// backward -> {dx (M, K), dweight (N, K), dbias (N)}; an entry is undefined when its flag is false.
#define PYENGINE_LINEAR_OPS(dev)                                                                        \
  at::Tensor linear_forward_##dev(const at::Tensor& x, const at::Tensor& weight,                       \
                                  const c10::optional<at::Tensor>& bias, int64_t activation = 0);      \
  std::vector<at::Tensor> linear_backward_##dev(const at::Tensor& grad_y, const at::Tensor& x,         \
                                                const at::Tensor& weight, bool need_x, bool need_weight, \
                                                bool need_bias, int64_t activation = 0,                  \
                                                const c10::optional<at::Tensor>& y = c10::nullopt);

// relu / sigmoid: any shape; the backward works from the saved output y.
#define PYENGINE_UNARY_OPS(name, dev)                             \
  at::Tensor name##_forward_##dev(const at::Tensor& x);           \
  at::Tensor name##_backward_##dev(const at::Tensor& grad_y, const at::Tensor& y);

// add: input and other share one dtype (the caller promotes); out = input + alpha * other, broadcast.
// backward: grad (out's shape) summed over the broadcast dims down to `shape`, times `scale`.
#define PYENGINE_ADD_OPS(dev)                                                                           \
  at::Tensor add_forward_##dev(const at::Tensor& input, const at::Tensor& other, const at::Scalar& alpha); \
  at::Tensor add_backward_##dev(const at::Tensor& grad, at::IntArrayRef shape, const at::Scalar& scale);

// cross_entropy: logits (N, C, D) contiguous, D = prod(d1..dk) (1 for (N, C) input);
// target (N, D) int64 class indices, or (N, C, D) class probabilities of the logits' dtype; weight (C).
// reduction: 0 none, 1 mean, 2 sum.
// forward -> {loss ((N, D) for none, else 0-dim; logits' dtype), lse (N, D) in the accumulation type,
//             denom (0-dim, accumulation type: the divisor of 'mean')}
// backward -> dlogits (N, C, D) = (softmax - smoothed target distribution) * weights * grad_loss / denom
#define PYENGINE_CROSS_ENTROPY_OPS(dev)                                                                     \
  std::vector<at::Tensor> cross_entropy_forward_##dev(                                                      \
      const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,          \
      int64_t ignore_index, int64_t reduction, double label_smoothing);                                     \
  at::Tensor cross_entropy_backward_##dev(const at::Tensor& grad_loss, const at::Tensor& logits,            \
                                          const at::Tensor& target, const c10::optional<at::Tensor>& weight, \
                                          const at::Tensor& lse, const at::Tensor& denom,                    \
                                          int64_t ignore_index, int64_t reduction, double label_smoothing);

// leaky_relu: the backward works from the saved input x (the slope may be zero or negative).
#define PYENGINE_LEAKY_RELU_OPS(dev)                                                  \
  at::Tensor leaky_relu_forward_##dev(const at::Tensor& x, double negative_slope);    \
  at::Tensor leaky_relu_backward_##dev(const at::Tensor& grad_y, const at::Tensor& x, double negative_slope);

// mse_loss: input and target of one shape and dtype (the caller broadcasts), contiguous.
// forward -> loss (input's shape for none, else 0-dim); backward -> {dinput, dtarget}, undefined where not needed.
// forward_with_grad: as binary_cross_entropy_with_logits' below.
#define PYENGINE_MSE_LOSS_OPS(dev)                                                                          \
  at::Tensor mse_loss_forward_##dev(const at::Tensor& input, const at::Tensor& target, int64_t reduction);  \
  std::vector<at::Tensor> mse_loss_backward_##dev(const at::Tensor& grad_loss, const at::Tensor& input,     \
                                                  const at::Tensor& target, int64_t reduction, bool need_input, \
                                                  bool need_target);                                        \
  std::vector<at::Tensor> mse_loss_forward_with_grad_##dev(const at::Tensor& input, const at::Tensor& target,  \
                                                           int64_t reduction);

// binary_cross_entropy_with_logits: input, target and the optional weight and pos_weight all of one shape and
// dtype (the caller broadcasts the weights), contiguous. Outputs as mse_loss.
// forward_with_grad: the training forward of 'mean'/'sum' (reduction 1 or 2) -> {loss (0-dim), dinput for an
// incoming gradient of 1}: the forward's loss bit for bit, the backward's dinput to a rounding or two.
#define PYENGINE_BCE_WITH_LOGITS_OPS(dev)                                                                     \
  at::Tensor binary_cross_entropy_with_logits_forward_##dev(                                                  \
      const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,             \
      const c10::optional<at::Tensor>& pos_weight, int64_t reduction);                                        \
  std::vector<at::Tensor> binary_cross_entropy_with_logits_backward_##dev(                                    \
      const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,                         \
      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight, int64_t reduction, \
      bool need_input, bool need_target);                                                                    \
  std::vector<at::Tensor> binary_cross_entropy_with_logits_forward_with_grad_##dev(                           \
      const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,             \
      const c10::optional<at::Tensor>& pos_weight, int64_t reduction);

// fused_mlp: a whole MLP, widths n_0 .. n_L each 1..128 (see common/fused_mlp.h for the math): x (M, n_0),
// weights[l] (n_{l+1}, n_l), biases[l] (n_{l+1}); activation / output_activation: 0 none, 1 relu, 2 sigmoid.
// forward -> {y (M, n_L), hidden a_1 (M, n_1), ..., a_{L-1}}: the hidden layers' post-activation outputs.
// backward -> {dx, dW_0 .. dW_{L-1}, db_0 .. db_{L-1}}; entries undefined where their flag is false.
#define PYENGINE_FUSED_MLP_OPS(dev)                                                                              \
  std::vector<at::Tensor> fused_mlp_forward_##dev(const at::Tensor& x, const std::vector<at::Tensor>& weights,  \
                                                  const std::vector<at::Tensor>& biases, int64_t activation,    \
                                                  int64_t output_activation);                                   \
  std::vector<at::Tensor> fused_mlp_backward_##dev(                                                             \
      const at::Tensor& grad_y, const at::Tensor& x, const std::vector<at::Tensor>& weights,                    \
      const std::vector<at::Tensor>& hidden, const at::Tensor& y, int64_t activation, int64_t output_activation, \
      bool need_x, bool need_weights, bool need_biases);

// FusedMLP's training step in one pass over the rows (CPU; CUDA composes the fused_mlp and loss kernels): x, the
// network as for fused_mlp_forward, loss 0 mse (target (M, n_L)), 1 bce with logits (target (M, n_L)),
// 2 cross_entropy (target (M) int64, -100 ignored), each the mean -> {loss (0-dim), grad (the parameters packed
// as pyengine.nn.FusedMLP.params: W_0, b_0, W_1, ...)}.
#define PYENGINE_CPU_ONLY_OPS                                                                                  \
  std::vector<at::Tensor> fused_mlp_training_step_cpu(const at::Tensor& x, const std::vector<at::Tensor>& weights, \
                                                      const std::vector<at::Tensor>& biases, int64_t activation,  \
                                                      int64_t output_activation, const at::Tensor& target,        \
                                                      int64_t loss);

// linear_cross_entropy: x (N, H), weight (V, H), bias (V), target (N) int64; reduction 0 none, 1 mean, 2 sum.
// cross_entropy(x @ weight^T + bias, target) computed over chunks of rows of at most chunk_bytes of logits.
// forward -> {loss ((N) for none, else 0-dim; x's dtype), lse (N), denom (0-dim: the kept rows' count),
//             dx (N, H), dweight (V, H), dbias (V)}: the gradients of the loss returned (the mean's divided by
//             denom), computed in the same pass, for mean/sum and each flag set (else undefined). lse, denom and
//             the gradients are in the accumulation type (float for float/half/bfloat16).
// backward (reduction none; recomputes the logits) -> {dx, dweight, dbias} of sum_r grad_loss_r loss_r, grad_loss
// (N) and the results in the accumulation type.
#define PYENGINE_LINEAR_CROSS_ENTROPY_OPS(dev)                                                                    \
  std::vector<at::Tensor> linear_cross_entropy_forward_##dev(                                                     \
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,                      \
      const at::Tensor& target, int64_t ignore_index, int64_t reduction, double label_smoothing, bool need_x,     \
      bool need_weight, bool need_bias, int64_t chunk_bytes);                                                     \
  std::vector<at::Tensor> linear_cross_entropy_backward_##dev(                                                    \
      const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,                                 \
      const c10::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,                     \
      int64_t ignore_index, double label_smoothing, bool need_x, bool need_weight, bool need_bias,                \
      int64_t chunk_bytes);

// cross_entropy_forward_with_grad: the training forward of 'mean'/'sum' (reduction 1 or 2), arguments as
// cross_entropy_forward -> {loss (0-dim), dlogits (N, C, D) for an incoming gradient of 1, denom}.
#define PYENGINE_CROSS_ENTROPY_WITH_GRAD_OPS(dev)                                                        \
  std::vector<at::Tensor> cross_entropy_forward_with_grad_##dev(                                         \
      const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,       \
      int64_t ignore_index, int64_t reduction, double label_smoothing);

#define PYENGINE_ALL_OPS(dev)                     \
  PYENGINE_LINEAR_OPS(dev)           \
  PYENGINE_UNARY_OPS(relu, dev)      \
  PYENGINE_UNARY_OPS(sigmoid, dev)   \
  PYENGINE_UNARY_OPS(tanh, dev)      \
  PYENGINE_LEAKY_RELU_OPS(dev)       \
  PYENGINE_ADD_OPS(dev)              \
  PYENGINE_CROSS_ENTROPY_OPS(dev)    \
  PYENGINE_MSE_LOSS_OPS(dev)         \
  PYENGINE_BCE_WITH_LOGITS_OPS(dev)         \
  PYENGINE_FUSED_MLP_OPS(dev)               \
  PYENGINE_LINEAR_CROSS_ENTROPY_OPS(dev)    \
  PYENGINE_CROSS_ENTROPY_WITH_GRAD_OPS(dev)

// The CPU kernels: defined in csrc/cpu/*.cpp, which are compiled once per CPU capability with this namespace
// renamed pyengine_<CAPABILITY> (route.h declares each build's and calls the one chosen at run time).
PYENGINE_ALL_OPS(cpu)
PYENGINE_CPU_ONLY_OPS
#ifdef PYENGINE_WITH_CUDA
PYENGINE_ALL_OPS(cuda)
#endif

}  // namespace pyengine

// fused_mlp's C++ autograd Functions (the twin of pyengine/ops/fused_mlp.py FusedMLPFunction, for the weights as
// lists and for pyengine.nn.FusedMLP's packed parameters), and FusedMLP's training step, which runs forward,
// loss, backward and the SGD update as one call with no autograd graph at all.
#include "autograd.h"

#include <torch/extension.h>

#include <utility>

#include "autograd_common.h"
#include "common/fused_mlp.h"
#include "route.h"

namespace pyengine {
namespace autograd {
namespace {

constexpr const char* kUnfusedMLP = "an unfused torch.nn.Sequential of Linear and activation layers";

// fused_mlp's forward for both nodes below: x (*, n_0) runs as (M, n_0), y comes back viewed as (*, n_L). Saves
// {x (M, n_0), y (M, n_L), a_1 .. a_{L-1}, then `parameters`}: what the backward reads besides the weights, and
// the tensors that want gradients (the weights, or the packed parameters they are views of). Without an output
// activation the backward does not read y's values: then y stays out of the saved variables (an alias in
// saved_data, whose version autograd does not check), so changing the output in place does not fail the
// backward, as it does not fail torch's last Linear.
at::Tensor fused_mlp_forward_saving(AutogradContext* ctx, const at::Tensor& x, const variable_list& weights,
                                    const variable_list& biases, int64_t activation, int64_t output_activation,
                                    const variable_list& parameters) {
  TORCH_CHECK(x.dim() >= 1, "fused_mlp: input must be at least 1-D");
  const at::Tensor x2 = as_matrix(x);
  variable_list outputs = pyengine::fused_mlp_forward(x2, weights, biases, activation, output_activation);
  at::Tensor y = outputs[0];
  outputs[0] = x2;
  outputs.insert(outputs.begin() + 1, y);
  outputs.insert(outputs.end(), parameters.begin(), parameters.end());
  if (output_activation == 0) {  // no output activation
    ctx->saved_data["y"] = y.detach();
    outputs[1] = at::Tensor();
  }
  ctx->save_for_backward(outputs);
  ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["output_activation"] = output_activation;
  ctx->saved_data["x_shape"] = x.sizes().vec();
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);
}

// {dx, dW_0 .. dW_{L-1}, db_0 .. db_{L-1}} (undefined where not needed) from the saved tensors and the weights.
variable_list fused_mlp_backward_saved(AutogradContext* ctx, const variable_list& saved, const variable_list& weights,
                                       const at::Tensor& grad, bool need_x, bool need_weights, bool need_biases) {
  const int64_t layers = ctx->saved_data["layers"].toInt();
  const at::Tensor& x2 = saved[0];
  const at::Tensor y = saved[1].defined() ? saved[1] : ctx->saved_data["y"].toTensor();
  const variable_list hidden(saved.begin() + 2, saved.begin() + 1 + layers);
  variable_list grads = pyengine::fused_mlp_backward(
      grad.reshape(y.sizes()), x2, weights, hidden, y, ctx->saved_data["activation"].toInt(),
      ctx->saved_data["output_activation"].toInt(), need_x, need_weights, need_biases);
  if (grads[0].defined()) grads[0] = grads[0].reshape(ctx->saved_data["x_shape"].toIntVector());
  return grads;
}

// pyengine.nn.FusedMLP.params: per layer W_l (n_{l+1}, n_l) row-major, then b_l (n_{l+1}) -- the layout the CPU
// kernel keeps its network in. Unpacked as views, no copies.
std::pair<variable_list, variable_list> unpack_mlp_params(const at::Tensor& params,
                                                          const std::vector<int64_t>& widths) {
  TORCH_CHECK_VALUE(widths.size() >= 2 && widths.size() <= fused_mlp::kMaxLayers + 1, "fused_mlp: needs 2 to ",
                    fused_mlp::kMaxLayers + 1, " widths (input, hidden..., output), got ", widths.size());
  int64_t count = 0;
  for (size_t l = 0; l < widths.size(); ++l) {
    TORCH_CHECK_VALUE(widths[l] >= 1 && widths[l] <= fused_mlp::kMaxWidth, "fused_mlp: every width must be 1 to ",
                      fused_mlp::kMaxWidth, ", got widths ", at::IntArrayRef(widths));
    if (l > 0) count += widths[l] * (widths[l - 1] + 1);
  }
  TORCH_CHECK(params.dim() == 1 && params.numel() == count, "fused_mlp: the packed parameters of widths ",
              at::IntArrayRef(widths), " are ", count, " numbers in a 1-D tensor, got shape ", params.sizes());
  variable_list weights, biases;
  int64_t at = 0;
  for (size_t l = 1; l < widths.size(); ++l) {
    const int64_t n_in = widths[l - 1], n_out = widths[l];
    weights.push_back(params.narrow(0, at, n_out * n_in).view({n_out, n_in}));
    biases.push_back(params.narrow(0, at + n_out * n_in, n_out));
    at += n_out * (n_in + 1);
  }
  return {weights, biases};
}

// The backward kernel's {dx, dW_0 .. dW_{L-1}, db_0 .. db_{L-1}} as one gradient in the packed layout.
at::Tensor pack_mlp_grads(const variable_list& g) {
  const size_t layers = (g.size() - 1) / 2;
  variable_list pieces;
  for (size_t l = 0; l < layers; ++l) {
    pieces.push_back(g[1 + l].view({-1}));
    pieces.push_back(g[1 + layers + l]);
  }
  return at::cat(pieces);
}

// FusedMLP.training_step's loss and packed parameter gradient, on the CPU in one pass over the rows.
std::pair<at::Tensor, at::Tensor> training_step_in_one_pass(const at::Tensor& x2, const variable_list& weights,
                                                            const variable_list& biases, int64_t activation,
                                                            int64_t output_activation, const at::Tensor& target,
                                                            int64_t loss) {
  const at::Tensor t = loss == 2 ? target.reshape({-1}) : target.reshape({x2.size(0), weights.back().size(0)});
  const variable_list r =
      fused_mlp_training_step_on_cpu(x2, weights, biases, activation, output_activation, t, loss);
  return {r[0], r[1]};
}

// The same from the fused_mlp and loss kernels in turn (any device).
std::pair<at::Tensor, at::Tensor> training_step_composed(const at::Tensor& x2, const variable_list& weights,
                                                         const variable_list& biases, int64_t activation,
                                                         int64_t output_activation, const at::Tensor& target,
                                                         int64_t loss) {
  const variable_list outputs = pyengine::fused_mlp_forward(x2, weights, biases, activation, output_activation);
  const at::Tensor& y = outputs[0];
  const int64_t M = y.size(0), classes = y.size(1);
  constexpr int64_t kMean = 1;
  at::Tensor value, grad_y;
  if (loss == 2) {
    const variable_list r = pyengine::cross_entropy_forward_with_grad(
        y.view({M, classes, 1}), target.reshape({M, 1}).contiguous(), c10::nullopt, -100, kMean, 0.0);
    value = r[0];
    grad_y = r[1].view({M, classes});
  } else {
    const at::Tensor t = target.reshape(y.sizes()).contiguous(), one = at::ones({}, y.options());
    if (loss == 0) {
      value = pyengine::mse_loss_forward(y, t, kMean);
      grad_y = pyengine::mse_loss_backward(one, y, t, kMean, true, false)[0];
    } else {
      value = pyengine::binary_cross_entropy_with_logits_forward(y, t, c10::nullopt, c10::nullopt, kMean);
      grad_y = pyengine::binary_cross_entropy_with_logits_backward(one, y, t, c10::nullopt, c10::nullopt, kMean, true,
                                                                   false)[0];
    }
  }
  const variable_list hidden(outputs.begin() + 1, outputs.end());
  const variable_list g = pyengine::fused_mlp_backward(grad_y, x2, weights, hidden, y, activation, output_activation,
                                                       false, true, true);
  return {value, pack_mlp_grads(g)};
}

}  // namespace

// fused_mlp with lists of weights (n_{l+1}, n_l) and biases (n_{l+1}): pyengine.functional.fused_mlp.
struct FusedMLPFunction : torch::autograd::Function<FusedMLPFunction> {
  // TensorList, not std::vector: autograd takes the tensors of an ArrayRef (only) as inputs with gradients
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            int64_t activation, int64_t output_activation) {
    return fused_mlp_forward_saving(ctx, x, weights.vec(), biases.vec(), activation, output_activation,
                                    weights.vec());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool recording = at::GradMode::is_enabled();
    const variable_list saved = ctx->get_saved_variables();
    const int64_t layers = ctx->saved_data["layers"].toInt();
    const variable_list weights(saved.end() - layers, saved.end());
    bool need_weights = false, need_biases = false;
    for (int64_t l = 0; l < layers; ++l) {
      need_weights |= ctx->needs_input_grad(1 + l);
      need_biases |= ctx->needs_input_grad(1 + layers + l);
    }
    variable_list result;
    {
      at::AutoGradMode no_recording(false);
      result = fused_mlp_backward_saved(ctx, saved, weights, grads[0], ctx->needs_input_grad(0), need_weights,
                                        need_biases);
    }
    result.resize(result.size() + 2);  // the activation codes
    return recording ? link_to_error(std::move(result), saved, "fused_mlp", kUnfusedMLP) : result;
  }
};

// fused_mlp with every weight and bias packed in one tensor (unpack_mlp_params): pyengine.nn.FusedMLP, whose
// step then has one parameter to accumulate a gradient into and to update, not 2L.
struct PackedFusedMLPFunction : torch::autograd::Function<PackedFusedMLPFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& params,
                            const std::vector<int64_t>& widths, int64_t activation, int64_t output_activation) {
    const auto [weights, biases] = unpack_mlp_params(params, widths);
    ctx->saved_data["widths"] = widths;
    return fused_mlp_forward_saving(ctx, x, weights, biases, activation, output_activation, {params});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool recording = at::GradMode::is_enabled();
    const variable_list saved = ctx->get_saved_variables();
    const bool need_params = ctx->needs_input_grad(1);
    variable_list result;
    {
      at::AutoGradMode no_recording(false);
      const variable_list weights = unpack_mlp_params(saved.back(), ctx->saved_data["widths"].toIntVector()).first;
      const variable_list g =
          fused_mlp_backward_saved(ctx, saved, weights, grads[0], ctx->needs_input_grad(0), need_params, need_params);
      result = {g[0], need_params ? pack_mlp_grads(g) : at::Tensor(), {}, {}, {}};
    }
    return recording ? link_to_error(std::move(result), saved, "fused_mlp", kUnfusedMLP) : result;
  }
};

// One step of plain SGD on a mean loss over FusedMLP's packed parameters: what
//   params.grad = None; loss_fn(mlp(x), target).backward(); torch.optim.SGD([params], lr).step()
// computes, as one call with no autograd graph (pyengine/nn.py FusedMLP.training_step checks the arguments):
//   y = mlp(x) (M, n_L);  the loss and dloss/dy;  dparams by backpropagation;  params -= lr * dparams;
//   params.grad = dparams.
// On the CPU one pass over the rows (cpu/fused_mlp_step.h); elsewhere the fused_mlp and loss kernels in turn.
// loss: 0 mse_loss, 1 binary_cross_entropy_with_logits (target like y), 2 cross_entropy (target (M) class
// indices, ignore_index -100). Returns the loss.
at::Tensor fused_mlp_training_step(const at::Tensor& x, const at::Tensor& params, const std::vector<int64_t>& widths,
                                   int64_t activation, int64_t output_activation, const at::Tensor& target,
                                   int64_t loss, double lr) {
  TORCH_CHECK_VALUE(loss >= 0 && loss <= 2, "fused_mlp_training_step: loss must be 0 (mse), 1 (bce with logits) ",
                    "or 2 (cross_entropy), got ", loss);
  TORCH_CHECK(x.dim() >= 1, "fused_mlp: input must be at least 1-D");
  at::NoGradGuard no_graph;
  const auto [weights, biases] = unpack_mlp_params(params, widths);
  const at::Tensor x2 = as_matrix(x);
  const auto [value, grad] = x2.is_cpu() ? training_step_in_one_pass(x2, weights, biases, activation,
                                                                     output_activation, target, loss)
                                         : training_step_composed(x2, weights, biases, activation, output_activation,
                                                                  target, loss);
  at::Tensor(params).sub_(grad, lr);  // a leaf that wants gradients: updated in place outside the graph, as SGD does
  at::Tensor(params).mutable_grad() = grad;
  return value;
}

at::Tensor fused_mlp(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                     const std::vector<at::Tensor>& biases, int64_t activation, int64_t output_activation) {
  TORCH_CHECK_VALUE(weights.size() == biases.size(), "fused_mlp: one bias per weight, got ", biases.size(),
                    " biases for ", weights.size(), " weights");
  return FusedMLPFunction::apply(x, at::TensorList(weights), at::TensorList(biases), activation, output_activation);
}
at::Tensor fused_mlp_packed(const at::Tensor& x, const at::Tensor& params, const std::vector<int64_t>& widths,
                            int64_t activation, int64_t output_activation) {
  return PackedFusedMLPFunction::apply(x, params, widths, activation, output_activation);
}

void name_fused_mlp_graph_nodes() {
  name_graph_node<FusedMLPFunction>("FusedMLPFunctionBackward");
  name_graph_node<PackedFusedMLPFunction>("FusedMLPFunctionBackward");  // the same op to its user
}

}  // namespace autograd
}  // namespace pyengine

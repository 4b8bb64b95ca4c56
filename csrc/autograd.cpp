// torch::autograd::Function twins of the Python Functions in pyengine/ops/<op>.py: the same kernels, the same
// saved tensors, the same gradients. A Python torch.autograd.Function costs about 8 us per call in the forward and
// again in the backward (benchmarks/NOTES.md, "Per-call overhead"), which a model of small layers pays on every
// op; these nodes cost what torch's own do. pyengine.functional calls them whenever the cpp or cuda backend runs
// eagerly (pyengine/_backend.py, compiled_autograd); the Python Functions stay for the python backend, for
// torch.compile (which traces them into torch.ops.pyengine) and for callers of <Op>Function.apply.
//
// Double backward: while autograd records a backward (create_graph=True), grad mode is on inside it, and the
// backward runs the python reference formula instead of the kernel, as the Python Functions do
// (_backend.backward_kernels), so that autograd can differentiate the gradient once more.
#include "autograd.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <string>
#include <utility>

#include "common/fused_mlp.h"
#include "route.h"

namespace pyengine {
namespace autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Leaked on purpose: a tensor's graph can outlive the interpreter's teardown, and this must not be destroyed
// (decref'ed without the GIL) before it.
pybind11::object* reference_kernels = nullptr;

// reference_kernels.<name>(args...) under the GIL; a tuple result becomes a list with None as undefined.
template <typename... Args>
variable_list call_reference(const char* name, Args&&... args) {
  TORCH_CHECK(reference_kernels != nullptr, "pyengine: the python reference kernels were never registered ",
              "(pyengine._backend does it at import)");
  pybind11::gil_scoped_acquire gil;
  pybind11::object out = reference_kernels->attr(name)(std::forward<Args>(args)...);
  variable_list result;
  if (pybind11::isinstance<pybind11::tuple>(out)) {
    for (const pybind11::handle item : out) result.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
  } else {
    result.push_back(out.cast<at::Tensor>());
  }
  return result;
}

c10::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// The gradients of an op with no double backward, when autograd records its backward (create_graph=True), as
// pyengine/ops/_function.py first_order_only gives the Python Functions: attached to a node that raises
// `op has no double backward` when differentiated, with the saved tensors that want gradients linked to it too,
// so that a gradient asked of them raises instead of finding them unused.
variable_list link_to_error(variable_list grads, const variable_list& saved, const char* op, const char* instead) {
  const size_t count = grads.size();
  for (at::Tensor& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_();
  }
  for (const at::Tensor& t : saved) {
    if (t.defined() && t.requires_grad()) grads.push_back(t);
  }
  const std::string message = std::string("pyengine.") + op + " has no double backward (its backward is not " +
                              "differentiable); use " + instead + " where a second derivative is needed";
  auto error = std::make_shared<torch::autograd::DelayedError>(message, static_cast<int64_t>(grads.size()));
  variable_list linked = (*error)(std::move(grads));
  linked.resize(count);
  return linked;
}

// (M, K) with M the product of the leading dims (not numel / K: K may be 0)
at::Tensor as_matrix(const at::Tensor& x) {
  return x.dim() == 2 ? x : x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), x.size(-1)});
}

}  // namespace

// Named outside the anonymous namespace: the names show in grad_fn.name() (torch::autograd::CppNode<...>).

// y = op(x), dx = op_backward(dy, y): relu, sigmoid and tanh need only their output in the backward.
template <typename Op>
struct OutputSavingFunction : torch::autograd::Function<OutputSavingFunction<Op>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::Tensor y = Op::forward(x);
    ctx->save_for_backward({y});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor y = ctx->get_saved_variables()[0];
    if (at::GradMode::is_enabled()) return call_reference(Op::backward_name, grads[0], y);
    return {Op::backward(grads[0], y)};
  }
};

struct Relu {
  static constexpr const char* backward_name = "relu_backward";
  static at::Tensor forward(const at::Tensor& x) { return pyengine::relu_forward(x); }
  static at::Tensor backward(const at::Tensor& dy, const at::Tensor& y) { return pyengine::relu_backward(dy, y); }
};
struct Sigmoid {
  static constexpr const char* backward_name = "sigmoid_backward";
  static at::Tensor forward(const at::Tensor& x) { return pyengine::sigmoid_forward(x); }
  static at::Tensor backward(const at::Tensor& dy, const at::Tensor& y) { return pyengine::sigmoid_backward(dy, y); }
};
struct Tanh {
  static constexpr const char* backward_name = "tanh_backward";
  static at::Tensor forward(const at::Tensor& x) { return pyengine::tanh_forward(x); }
  static at::Tensor backward(const at::Tensor& dy, const at::Tensor& y) { return pyengine::tanh_backward(dy, y); }
};

// y = x if x > 0 else slope * x; the backward needs the input (the slope may be 0 or negative).
struct LeakyReLUFunction : torch::autograd::Function<LeakyReLUFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double slope) {
    ctx->save_for_backward({x});
    ctx->saved_data["slope"] = slope;
    return pyengine::leaky_relu_forward(x, slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const double slope = ctx->saved_data["slope"].toDouble();
    if (at::GradMode::is_enabled()) return {call_reference("leaky_relu_backward", grads[0], x, slope)[0], {}};
    return {pyengine::leaky_relu_backward(grads[0], x, slope), {}};
  }
};

// x (*, K) flattened to (M, K); y = act(x W^T + b) (M, N) viewed back as (*, N). Saves x and W, and y when an
// activation's derivative needs it (dz = dy * act'(y)).
struct LinearFunction : torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, int64_t activation) {
    at::Tensor y = pyengine::linear_forward(as_matrix(x), weight, bias, activation);
    if (x.dim() != 2) {
      std::vector<int64_t> shape = x.sizes().vec();
      shape.back() = weight.size(0);
      y = y.view(shape);
    }
    // y as returned, so that it is saved as this node's output and double backward differentiates act'(y) too
    ctx->save_for_backward(activation ? variable_list{x, weight, y} : variable_list{x, weight});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const at::Tensor x2 = as_matrix(x);
    const at::Tensor grad_y = grads[0].reshape({x2.size(0), weight.size(0)});
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const c10::optional<at::Tensor> y = activation ? c10::optional<at::Tensor>(saved[2].reshape(grad_y.sizes()))
                                                   : c10::nullopt;
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    variable_list g =
        at::GradMode::is_enabled()
            ? call_reference("linear_backward", grad_y, x2, weight, need_x, need_weight, need_bias, activation, y)
            : pyengine::linear_backward(grad_y, x2, weight, need_x, need_weight, need_bias, activation, y);
    if (g[0].defined() && x.dim() != 2) g[0] = g[0].reshape(x.sizes());
    return {g[0], g[1], g[2], {}};
  }
};

// out = input + alpha * other, broadcast (one dtype and device: the functional form promotes the rest). Its
// backward sums dout over each operand's broadcast dims; input's gradient is dout itself when input was not
// broadcast (no copy: autograd copies before it stores a gradient somebody else holds), as torch's add does.
struct AddFunction : torch::autograd::Function<AddFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& other, double alpha) {
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["input_shape"] = input.sizes().vec();
    ctx->saved_data["other_shape"] = other.sizes().vec();
    return pyengine::add_forward(input, other, at::Scalar(alpha));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const std::vector<int64_t> input_shape = ctx->saved_data["input_shape"].toIntVector();
    const std::vector<int64_t> other_shape = ctx->saved_data["other_shape"].toIntVector();
    const bool recording = at::GradMode::is_enabled();
    auto reduce = [&](const std::vector<int64_t>& shape, double scale) {
      return recording ? call_reference("add_backward", grad, shape, scale)[0]
                       : pyengine::add_backward(grad, shape, at::Scalar(scale));
    };
    at::Tensor grad_input, grad_other;
    if (ctx->needs_input_grad(0)) {
      grad_input = !recording && grad.sizes() == at::IntArrayRef(input_shape) ? grad : reduce(input_shape, 1.0);
    }
    if (ctx->needs_input_grad(1)) grad_other = reduce(other_shape, alpha);
    return {grad_input, grad_other, {}};
  }
};

// Losses over input and target of one shape and dtype (the functional form broadcast them); the kernels take
// contiguous tensors. The inputs themselves are saved, so that double backward reaches them.
struct MSELossFunction : torch::autograd::Function<MSELossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            int64_t reduction) {
    ctx->save_for_backward({input, target});
    ctx->saved_data["reduction"] = reduction;
    return pyengine::mse_loss_forward(input.contiguous(), target.contiguous(), reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor input = saved[0].contiguous(), target = saved[1].contiguous(), grad = grads[0].contiguous();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    variable_list g = at::GradMode::is_enabled()
                          ? call_reference("mse_loss_backward", grad, input, target, reduction, need_input,
                                           need_target)
                          : pyengine::mse_loss_backward(grad, input, target, reduction, need_input, need_target);
    return {g[0], g[1], {}};
  }
};

struct BinaryCrossEntropyWithLogitsFunction : torch::autograd::Function<BinaryCrossEntropyWithLogitsFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                            int64_t reduction) {
    ctx->save_for_backward({input, target, weight.value_or(at::Tensor()), pos_weight.value_or(at::Tensor())});
    ctx->saved_data["reduction"] = reduction;
    return pyengine::binary_cross_entropy_with_logits_forward(input.contiguous(), target.contiguous(),
                                                              contiguous(weight), contiguous(pos_weight), reduction);
  }
  static c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor input = saved[0].contiguous(), target = saved[1].contiguous(), grad = grads[0].contiguous();
    const c10::optional<at::Tensor> weight = contiguous(as_optional(saved[2]));
    const c10::optional<at::Tensor> pos_weight = contiguous(as_optional(saved[3]));
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    variable_list g = at::GradMode::is_enabled()
                          ? call_reference("binary_cross_entropy_with_logits_backward", grad, input, target, weight,
                                           pos_weight, reduction, need_input, need_target)
                          : pyengine::binary_cross_entropy_with_logits_backward(
                                grad, input, target, weight, pos_weight, reduction, need_input, need_target);
    return {g[0], g[1], {}, {}, {}};
  }
};

namespace {

constexpr const char* kUnfusedMLP = "an unfused torch.nn.Sequential of Linear and activation layers";

// fused_mlp's forward for both nodes below: x (*, n_0) runs as (M, n_0), y comes back viewed as (*, n_L). Saves
// {x (M, n_0), y (M, n_L), a_1 .. a_{L-1}, then `parameters`}: what the backward reads besides the weights, and
// the tensors that want gradients (the weights, or the packed parameters they are views of).
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
  const at::Tensor &x2 = saved[0], &y = saved[1];
  const variable_list hidden(saved.begin() + 2, saved.begin() + 1 + layers);
  variable_list grads = pyengine::fused_mlp_backward(
      grad.reshape(y.sizes()), x2, weights, hidden, y, ctx->saved_data["activation"].toInt(),
      ctx->saved_data["output_activation"].toInt(), need_x, need_weights, need_biases);
  if (grads[0].defined()) grads[0] = grads[0].reshape(ctx->saved_data["x_shape"].toIntVector());
  return grads;
}

// pyengine.nn.FusedMLP.params: per layer W_l (n_{l+1}, n_l) row-major, then b_l (n_{l+1}) -- the layout the CPU
// kernel keeps its network in. Unpacked as views, no copies.
std::pair<variable_list, variable_list> unpack_mlp_params(const at::Tensor& params, const std::vector<int64_t>& widths) {
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
      at::Tensor grad_params;
      if (need_params) {  // back into the packed layout: W_0, b_0, W_1, b_1, ...
        const size_t layers = weights.size();
        variable_list pieces;
        for (size_t l = 0; l < layers; ++l) {
          pieces.push_back(g[1 + l].view({-1}));
          pieces.push_back(g[1 + layers + l]);
        }
        grad_params = at::cat(pieces);
      }
      result = {g[0], grad_params, {}, {}, {}};
    }
    return recording ? link_to_error(std::move(result), saved, "fused_mlp", kUnfusedMLP) : result;
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  int64_t activation) {
  return LinearFunction::apply(x, weight, bias, activation);
}
at::Tensor relu(const at::Tensor& x) { return OutputSavingFunction<Relu>::apply(x); }
at::Tensor sigmoid(const at::Tensor& x) { return OutputSavingFunction<Sigmoid>::apply(x); }
at::Tensor tanh(const at::Tensor& x) { return OutputSavingFunction<Tanh>::apply(x); }
at::Tensor leaky_relu(const at::Tensor& x, double negative_slope) {
  return LeakyReLUFunction::apply(x, negative_slope);
}
at::Tensor add(const at::Tensor& input, const at::Tensor& other, double alpha) {
  return AddFunction::apply(input, other, alpha);
}
at::Tensor mse_loss(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  return MSELossFunction::apply(input, target, reduction);
}
at::Tensor binary_cross_entropy_with_logits(const at::Tensor& input, const at::Tensor& target,
                                            const c10::optional<at::Tensor>& weight,
                                            const c10::optional<at::Tensor>& pos_weight, int64_t reduction) {
  return BinaryCrossEntropyWithLogitsFunction::apply(input, target, weight, pos_weight, reduction);
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

void set_reference(pybind11::object kernels) {
  pybind11::object* previous = reference_kernels;
  reference_kernels = new pybind11::object(std::move(kernels));
  delete previous;
}

}  // namespace autograd
}  // namespace pyengine

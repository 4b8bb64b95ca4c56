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
#include <torch/extension.h>

#include <utility>

#include "autograd_common.h"
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

}  // namespace

// Named outside the anonymous namespace: the names show in grad_fn.name() (torch::autograd::CppNode<...>).

// y = op(x), dx = op_backward(dy, y): relu, sigmoid and tanh need only their output in the backward. Their node
// is written as torch writes its own (a Node holding the saved output) rather than as a torch::autograd::Function,
// whose apply also records every input's and output's metadata and a context: about 1 us a call, as much as the
// kernel itself on a small tensor.
template <typename Op>
struct OutputSavingBackward : torch::autograd::Node {
  torch::autograd::SavedVariable saved_y;

  variable_list apply(variable_list&& grads) override {
    const at::Tensor y = saved_y.unpack(getptr());
    if (!grads[0].defined()) return {at::Tensor()};
    if (at::GradMode::is_enabled()) return call_reference(Op::backward_name, grads[0], y);
    return {Op::backward(grads[0], y)};
  }
  void release_variables() override { saved_y.reset_data(); }
};

template <typename Op>
at::Tensor output_saving(const at::Tensor& x) {
  if (!records_graph(x)) return Op::forward(x);
  at::Tensor y;
  {
    at::AutoGradMode no_recording(false);  // as a Function's forward: nothing inside is recorded
    y = Op::forward(x);
  }
  auto node = make_node<OutputSavingBackward<Op>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  torch::autograd::set_history(y, node);
  node->saved_y = torch::autograd::SavedVariable(y, /*is_output=*/true);
  return y;
}

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

// y = x if x > 0 else slope * x; the backward needs the input (the slope may be 0 or negative). A Node as above.
struct LeakyReLUBackward : torch::autograd::Node {
  torch::autograd::SavedVariable saved_x;
  double slope = 0;

  variable_list apply(variable_list&& grads) override {
    const at::Tensor x = saved_x.unpack();
    if (!grads[0].defined()) return {at::Tensor()};
    if (at::GradMode::is_enabled()) return {call_reference("leaky_relu_backward", grads[0], x, slope)[0]};
    return {pyengine::leaky_relu_backward(grads[0], x, slope)};
  }
  void release_variables() override { saved_x.reset_data(); }
};

// x (*, K) flattened to (M, K); y = act(x W^T + b) (M, N) viewed back as (*, N). Saves x and W, and y when an
// activation's derivative needs it (dz = dy * act'(y)).
struct LinearFunction : torch::autograd::Function<LinearFunction> {
  static at::Tensor output(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           int64_t activation) {
    const at::Tensor y = pyengine::linear_forward(as_matrix(x), weight, bias, activation);
    if (x.dim() == 2) return y;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return y.view(shape);
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, int64_t activation) {
    at::Tensor y = output(x, weight, bias, activation);
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
// A Node as above; it saves no tensor, only the operands' shapes and alpha.
struct AddBackward : torch::autograd::Node {
  std::vector<int64_t> input_shape, other_shape;
  double alpha = 1;

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor(), at::Tensor()};
    const bool recording = at::GradMode::is_enabled();
    auto reduce = [&](const std::vector<int64_t>& shape, double scale) {
      return recording ? call_reference("add_backward", grad, shape, scale)[0]
                       : pyengine::add_backward(grad, shape, at::Scalar(scale));
    };
    at::Tensor grad_input, grad_other;
    if (task_should_compute_output(0)) {
      grad_input = !recording && grad.sizes() == at::IntArrayRef(input_shape) ? grad : reduce(input_shape, 1.0);
    }
    if (task_should_compute_output(1)) grad_other = reduce(other_shape, alpha);
    return {grad_input, grad_other};
  }
};

// A fused loss's input gradient (computed by its forward for an incoming 1) for the incoming gradient: the usual 1
// returns it as it is; on a GPU reading the incoming value would wait for the device, so it is multiplied there.
static at::Tensor scaled_fused_gradient(const at::Tensor& fused_grad, const at::Tensor& incoming) {
  return !incoming.is_cpu() || incoming.item<double>() != 1.0 ? fused_grad * incoming : fused_grad;
}

// Losses over input and target of one shape and dtype (the functional form broadcast them); the kernels take
// contiguous tensors. The inputs themselves are saved, so that double backward reaches them.
// `fused` (a reduced loss whose input alone wants a gradient, float32/float64: fuses_input_gradient): the forward
// computes the input's gradient for an incoming 1 in the same pass as the loss, and the backward only scales it:
// one read of the operands in all, where the backward would read them again. Not for float16/bfloat16, whose saved
// gradient would be rounded twice when the incoming one is not 1. The operands are saved either way: double
// backward (create_graph) differentiates the reference's formulas from them.
struct MSELossFunction : torch::autograd::Function<MSELossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            int64_t reduction, bool fused) {
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["fused"] = fused;
    if (fused) {
      variable_list r = pyengine::mse_loss_forward_with_grad(input.contiguous(), target.contiguous(), reduction);
      ctx->save_for_backward({input, target, r[1]});
      return r[0];
    }
    ctx->save_for_backward({input, target});
    return pyengine::mse_loss_forward(input.contiguous(), target.contiguous(), reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["fused"].toBool() && !at::GradMode::is_enabled()) {
      return {scaled_fused_gradient(saved[2], grads[0]), {}, {}, {}};
    }
    const at::Tensor input = saved[0].contiguous(), target = saved[1].contiguous(), grad = grads[0].contiguous();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    variable_list g = at::GradMode::is_enabled()
                          ? call_reference("mse_loss_backward", grad, input, target, reduction, need_input,
                                           need_target)
                          : pyengine::mse_loss_backward(grad, input, target, reduction, need_input, need_target);
    return {g[0], g[1], {}, {}};
  }
};

// `fused`: as MSELossFunction's.
struct BinaryCrossEntropyWithLogitsFunction : torch::autograd::Function<BinaryCrossEntropyWithLogitsFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& pos_weight,
                            int64_t reduction, bool fused) {
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["fused"] = fused;
    variable_list saved{input, target, weight.value_or(at::Tensor()), pos_weight.value_or(at::Tensor())};
    at::Tensor loss;
    if (fused) {
      variable_list r = pyengine::binary_cross_entropy_with_logits_forward_with_grad(
          input.contiguous(), target.contiguous(), contiguous(weight), contiguous(pos_weight), reduction);
      loss = std::move(r[0]);
      saved.push_back(std::move(r[1]));
    } else {
      loss = pyengine::binary_cross_entropy_with_logits_forward(input.contiguous(), target.contiguous(),
                                                                contiguous(weight), contiguous(pos_weight), reduction);
    }
    ctx->save_for_backward(saved);
    return loss;
  }
  static c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool recording = at::GradMode::is_enabled();
    if (ctx->saved_data["fused"].toBool() && !recording) {
      return {scaled_fused_gradient(saved[4], grads[0]), {}, {}, {}, {}, {}};
    }
    const at::Tensor input = saved[0].contiguous(), target = saved[1].contiguous(), grad = grads[0].contiguous();
    const c10::optional<at::Tensor> weight = contiguous(as_optional(saved[2]));
    const c10::optional<at::Tensor> pos_weight = contiguous(as_optional(saved[3]));
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    variable_list g = recording ? call_reference("binary_cross_entropy_with_logits_backward", grad, input, target,
                                                 weight, pos_weight, reduction, need_input, need_target)
                                : pyengine::binary_cross_entropy_with_logits_backward(
                                      grad, input, target, weight, pos_weight, reduction, need_input, need_target);
    return {g[0], g[1], {}, {}, {}, {}};
  }
};

// cross_entropy of logits (N, C) and class indices (N) (pyengine/ops/cross_entropy.py SoftmaxCrossEntropyFunction,
// whose Python Function keeps every other case): the kernels see (N, C, 1) and (N, 1). `fused` (a reduced loss
// whose logits want a gradient, float32/float64): the gradient for an incoming 1 is computed with the loss, in
// one read of the logits, and the backward only scales it; else the backward recomputes p - y from the saved
// log-sum-exp. First order only, as the Python Function.
struct CrossEntropyFunction : torch::autograd::Function<CrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
                            double label_smoothing, bool fused) {
    const at::Tensor logits = input.contiguous().view({input.size(0), input.size(1), 1});
    const at::Tensor t = target.contiguous().view({target.size(0), 1});
    ctx->saved_data["fused"] = fused;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    // input, for the double-backward error to link to: kept outside the saved variables (no version check), since
    // the fused backward does not read it and torch's cross_entropy does not fail when the logits change in place
    ctx->saved_data["input"] = input;
    if (fused) {
      const variable_list r = pyengine::cross_entropy_forward_with_grad(logits, t, weight, ignore_index, reduction,
                                                                        label_smoothing);
      ctx->save_for_backward({r[1]});
      return r[0];
    }
    const variable_list r = pyengine::cross_entropy_forward(logits, t, weight, ignore_index, reduction,
                                                            label_smoothing);
    ctx->save_for_backward({logits, t, weight.value_or(at::Tensor()), r[1], r[2]});
    return reduction == 0 ? r[0].view({input.size(0)}) : r[0];
  }
  // The loss alone, when no graph is recorded.
  static at::Tensor loss(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                         int64_t ignore_index, int64_t reduction, double label_smoothing) {
    const at::Tensor r = pyengine::cross_entropy_forward(input.contiguous().view({input.size(0), input.size(1), 1}),
                                                         target.contiguous().view({target.size(0), 1}), weight,
                                                         ignore_index, reduction, label_smoothing)[0];
    return reduction == 0 ? r.view({input.size(0)}) : r;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool recording = at::GradMode::is_enabled();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor input = ctx->saved_data["input"].toTensor();
    at::Tensor grad;
    {
      at::AutoGradMode no_recording(false);
      if (ctx->saved_data["fused"].toBool()) {
        // the usual incoming 1 returns the saved gradient as it is; on a GPU reading it would wait for the device
        grad = saved[0];
        if (!grads[0].is_cpu() || grads[0].item<double>() != 1.0) grad = grad * grads[0];
      } else {
        const int64_t reduction = ctx->saved_data["reduction"].toInt();
        const at::Tensor g = reduction == 0 ? grads[0].reshape(saved[3].sizes()).contiguous() : grads[0];
        grad = pyengine::cross_entropy_backward(g, saved[0], saved[1], as_optional(saved[2]), saved[3], saved[4],
                                                ctx->saved_data["ignore_index"].toInt(), reduction,
                                                ctx->saved_data["label_smoothing"].toDouble());
      }
      grad = grad.view(input.sizes());
    }
    variable_list result{grad, {}, {}, {}, {}, {}, {}};
    return recording ? link_to_error(std::move(result), {input}, "cross_entropy", "torch.nn.functional.cross_entropy")
                     : result;
  }
};

// Each entry builds its node only when records_graph says a gradient will be asked for; else the kernel alone.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  int64_t activation) {
  return records_graph(x, weight, bias) ? LinearFunction::apply(x, weight, bias, activation)
                                        : LinearFunction::output(x, weight, bias, activation);
}
at::Tensor relu(const at::Tensor& x) {
  return output_saving<Relu>(x);
}
at::Tensor sigmoid(const at::Tensor& x) {
  return output_saving<Sigmoid>(x);
}
at::Tensor tanh(const at::Tensor& x) {
  return output_saving<Tanh>(x);
}
at::Tensor leaky_relu(const at::Tensor& x, double negative_slope) {
  if (!records_graph(x)) return pyengine::leaky_relu_forward(x, negative_slope);
  at::Tensor y;
  {
    at::AutoGradMode no_recording(false);
    y = pyengine::leaky_relu_forward(x, negative_slope);
  }
  auto node = make_node<LeakyReLUBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  node->saved_x = torch::autograd::SavedVariable(x, /*is_output=*/false);
  node->slope = negative_slope;
  torch::autograd::set_history(y, node);
  return y;
}
at::Tensor add(const at::Tensor& input, const at::Tensor& other, double alpha) {
  if (!records_graph(input, other)) return pyengine::add_forward(input, other, at::Scalar(alpha));
  at::Tensor out;
  {
    at::AutoGradMode no_recording(false);
    out = pyengine::add_forward(input, other, at::Scalar(alpha));
  }
  auto node = make_node<AddBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, other));
  node->input_shape = input.sizes().vec();
  node->other_shape = other.sizes().vec();
  node->alpha = alpha;
  torch::autograd::set_history(out, node);
  return out;
}
// Whether a loss's forward also computes the input's gradient (MSELossFunction's `fused`).
static bool fuses_input_gradient(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  return reduction != 0 && input.requires_grad() && !target.requires_grad() &&
         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
}

at::Tensor mse_loss(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  return records_graph(input, target)
             ? MSELossFunction::apply(input, target, reduction, fuses_input_gradient(input, target, reduction))
             : pyengine::mse_loss_forward(input.contiguous(), target.contiguous(), reduction);
}
at::Tensor binary_cross_entropy_with_logits(const at::Tensor& input, const at::Tensor& target,
                                            const c10::optional<at::Tensor>& weight,
                                            const c10::optional<at::Tensor>& pos_weight, int64_t reduction) {
  using F = BinaryCrossEntropyWithLogitsFunction;
  if (records_graph(input, target)) {
    return F::apply(input, target, weight, pos_weight, reduction, fuses_input_gradient(input, target, reduction));
  }
  return pyengine::binary_cross_entropy_with_logits_forward(input.contiguous(), target.contiguous(),
                                                            F::contiguous(weight), F::contiguous(pos_weight),
                                                            reduction);
}

at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                         int64_t ignore_index, int64_t reduction, double label_smoothing) {
  if (!records_graph(input)) {
    return CrossEntropyFunction::loss(input, target, weight, ignore_index, reduction, label_smoothing);
  }
  const bool fused = reduction != 0 && (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
  return CrossEntropyFunction::apply(input, target, weight, ignore_index, reduction, label_smoothing, fused);
}

void name_fused_mlp_graph_nodes();              // autograd_fused_mlp.cpp
void name_linear_cross_entropy_graph_node();  // autograd_linear_cross_entropy.cpp

void name_graph_nodes() {
  name_node_type<OutputSavingBackward<Relu>>("ReLUFunctionBackward");
  name_node_type<OutputSavingBackward<Sigmoid>>("SigmoidFunctionBackward");
  name_node_type<OutputSavingBackward<Tanh>>("TanhFunctionBackward");
  name_node_type<LeakyReLUBackward>("LeakyReLUFunctionBackward");
  name_graph_node<LinearFunction>("LinearFunctionBackward");
  name_node_type<AddBackward>("BroadcastAddFunctionBackward");
  name_graph_node<MSELossFunction>("MSELossFunctionBackward");
  name_graph_node<BinaryCrossEntropyWithLogitsFunction>("BinaryCrossEntropyWithLogitsFunctionBackward");
  name_graph_node<CrossEntropyFunction>("SoftmaxCrossEntropyFunctionBackward");
  name_fused_mlp_graph_nodes();
  name_linear_cross_entropy_graph_node();
}

void set_reference(pybind11::object kernels) {
  pybind11::object* previous = reference_kernels;
  reference_kernels = new pybind11::object(std::move(kernels));
  delete previous;
}

}  // namespace autograd
}  // namespace pyengine

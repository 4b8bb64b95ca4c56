// linear_cross_entropy's C++ autograd Function: the twin of pyengine/ops/linear_cross_entropy.py
// LinearCrossEntropyFunction for x (N, H), weight (V, H), bias (V) or none and int64 class indices (N), the
// functional form's usual call (it sends every other case to the Python Function). The Python Function's own
// cost (its forward's argument handling, ctx, six outputs) is about 100 us a call, as much as the whole of torch's
// linear + cross_entropy on the notes' 759 x 8 -> 10 layer.
//   'mean'/'sum', a gradient wanted: the forward kernel computes the loss's gradients in the same pass over the
//   chunks (the mean's divided by the kernel) and saves them; the backward of the usual incoming 1 returns them
//   as they are (autograd then takes dweight as weight.grad with no copy), any other incoming gradient scales them.
//   'none': the forward saves the inputs and each row's log-sum-exp; the backward computes the chunks' logits
//   again and turns them into g (p - y').
#include "autograd.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include "autograd_common.h"
#include "route.h"

namespace pyengine {
namespace autograd {
namespace {

constexpr const char* kUnfused = "cross_entropy(linear(...)) from torch.nn.functional";

}  // namespace

struct LinearCrossEntropyFunction : torch::autograd::Function<LinearCrossEntropyFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target, int64_t ignore_index,
                            int64_t reduction, double label_smoothing, int64_t chunk_bytes) {
    const bool reduced = reduction != 0, has_bias = bias.has_value() && bias->defined();
    const bool need_x = reduced && x.requires_grad(), need_weight = reduced && weight.requires_grad();
    const bool need_bias = reduced && has_bias && bias->requires_grad();
    const variable_list r = pyengine::linear_cross_entropy_forward(
        x, weight, bias, target, ignore_index, reduction, label_smoothing, need_x, need_weight, need_bias, chunk_bytes);
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    // the inputs are saved even where the backward reads only the gradients: changing one in place then fails the
    // backward, as it fails torch's linear + cross_entropy, and the double-backward error links to them
    if (reduced) {
      ctx->save_for_backward({r[3], r[4], r[5], x, weight, has_bias ? *bias : at::Tensor()});
    } else {
      ctx->save_for_backward({x, weight, has_bias ? *bias : at::Tensor(), target, r[1]});
    }
    return r[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool recording = at::GradMode::is_enabled();
    const variable_list saved = ctx->get_saved_variables();
    const bool reduced = ctx->saved_data["reduction"].toInt() != 0;
    const variable_list inputs(saved.begin() + (reduced ? 3 : 0), saved.begin() + (reduced ? 6 : 3));
    const at::ScalarType dtype = inputs[0].scalar_type();
    const bool need[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    variable_list result(8);
    {
      at::AutoGradMode no_recording(false);
      variable_list d;
      if (reduced) {
        const at::Tensor& g = grads[0];
        const bool one = g.is_cpu() && g.item<double>() == 1.0;
        for (size_t i = 0; i < 3; ++i) {
          const at::Tensor& s = saved[i];
          d.push_back(s.defined() && need[i] ? (one ? s : s * g.to(s.scalar_type())) : at::Tensor());
        }
      } else {
        const at::Tensor& lse = saved[4];
        d = pyengine::linear_cross_entropy_backward(
            grads[0].reshape({lse.size(0)}).to(lse.scalar_type()).contiguous(), saved[0], saved[1],
            saved[2].defined() ? c10::optional<at::Tensor>(saved[2]) : c10::nullopt, saved[3], lse,
            ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(), need[0], need[1],
            need[2] && saved[2].defined(), ctx->saved_data["chunk_bytes"].toInt());
      }
      for (size_t i = 0; i < 3; ++i) result[i] = d[i].defined() ? d[i].to(dtype) : at::Tensor();
    }
    return recording ? link_to_error(std::move(result), inputs, "linear_cross_entropy", kUnfused) : result;
  }
};

at::Tensor linear_cross_entropy(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& target_in, int64_t ignore_index, int64_t reduction,
                                double label_smoothing, int64_t chunk_bytes) {
  const at::Tensor target = target_in.contiguous();
  if (!records_graph(x, weight, bias)) {
    return pyengine::linear_cross_entropy_forward(x, weight, bias, target, ignore_index, reduction, label_smoothing,
                                                  false, false, false, chunk_bytes)[0];
  }
  return LinearCrossEntropyFunction::apply(x, weight, bias, target, ignore_index, reduction, label_smoothing,
                                           chunk_bytes);
}

void name_linear_cross_entropy_graph_node() {
  name_graph_node<LinearCrossEntropyFunction>("LinearCrossEntropyFunctionBackward");
}

}  // namespace autograd
}  // namespace pyengine

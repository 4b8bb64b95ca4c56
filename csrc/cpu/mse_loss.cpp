// mse_loss on the CPU. input x, target y: n elements, contiguous, one dtype.
//   none: l_i = (x_i - y_i)^2     sum: sum_i l_i     mean: sum_i l_i / n   (n = 0: NaN, as torch)
//   dx_i = 2 (x_i - y_i) * g_i (none) | g (sum) | g / n (mean);   dy_i = -dx_i
// Formulas: mse_loss_math / mse_loss_grad_math in common/math.h.
// forward_with_grad, the training forward of sum/mean: the loss and dx for g = 1 in one pass over x and y, so that
// the backward only scales dx (or returns it, for the usual incoming 1) instead of reading x and y again.
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/ops/scalar_tensor.h>

#include "cpu/elementwise.h"
#include "ops.h"

namespace pyengine {
namespace {

void check_operands(const at::Tensor& input, const at::Tensor& target, const char* op) {
  check(input, "input", op).cpu().floating().contiguous();
  check(target, "target", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
}

}  // namespace

at::Tensor mse_loss_forward_cpu(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  check_operands(input, target, "mse_loss_forward_cpu");
  const Reduction red = check_reduction(reduction, "mse_loss_forward_cpu");
  const int64_t n = input.numel();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_loss_forward_cpu", [&] {
    const auto loss = [](auto x, auto y) { return mse_loss_math(x, y); };
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* y = target.const_data_ptr<scalar_t>();
    if (red == Reduction::None) {
      out = cpu::empty_output(input.sizes(), input.options());
      cpu::map_acc(out.data_ptr<scalar_t>(), n, loss, x, y);
    } else {
      acc_t<scalar_t> total = cpu::sum_acc<scalar_t>(n, loss, x, y);
      if (red == Reduction::Mean) total /= static_cast<acc_t<scalar_t>>(n);
      out = at::scalar_tensor(static_cast<double>(total), input.options());
    }
  });
  return out;
}

std::vector<at::Tensor> mse_loss_forward_with_grad_cpu(const at::Tensor& input, const at::Tensor& target,
                                                      int64_t reduction) {
  const char* op = "mse_loss_forward_with_grad_cpu";
  check_operands(input, target, op);
  const Reduction red = check_reduction(reduction, op);
  TORCH_CHECK(red != Reduction::None, op, ": reduction must be mean or sum (1 or 2), got none");
  const int64_t n = input.numel();
  at::Tensor loss, grad_input = cpu::empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "mse_loss_forward_with_grad_cpu", [&] {
    using acc = acc_t<scalar_t>;
    // the backward's g for an incoming 1: dx is what backward(1) gives, and the loss the forward's sum
    const acc scale = red == Reduction::Mean ? acc(1) / static_cast<acc>(n) : acc(1);
    acc total = cpu::sum_and_map_acc(grad_input.data_ptr<scalar_t>(), n, [scale](auto xv, auto yv) {
      return mse_loss_and_grad_math(xv, yv, decltype(xv)(scale));
    }, input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>());
    if (red == Reduction::Mean) total /= static_cast<acc>(n);
    loss = at::scalar_tensor(static_cast<double>(total), input.options());
  });
  return {loss, grad_input};
}

std::vector<at::Tensor> mse_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& input,
                                              const at::Tensor& target, int64_t reduction, bool need_input,
                                              bool need_target) {
  check_operands(input, target, "mse_loss_backward_cpu");
  const Reduction red = check_reduction(reduction, "mse_loss_backward_cpu");
  check(grad_loss, "grad_loss", "mse_loss_backward_cpu").same_device(input).same_dtype(input)
      .sizes(red == Reduction::None ? input.sizes() : at::IntArrayRef{});
  const int64_t n = input.numel();
  at::Tensor grad_input, grad_target;
  if (!need_input && !need_target) return {grad_input, grad_target};
  at::Tensor grad = cpu::empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_loss_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* y = target.const_data_ptr<scalar_t>();
    if (red == Reduction::None) {
      const at::Tensor g = grad_loss.contiguous();
      cpu::map_acc(grad.data_ptr<scalar_t>(), n, [](auto xv, auto yv, auto gv) { return mse_loss_grad_math(xv, yv, gv); },
                   x, y, g.const_data_ptr<scalar_t>());
    } else {
      acc scale = grad_loss.item().to<acc>();
      if (red == Reduction::Mean) scale /= static_cast<acc>(n);
      cpu::map_acc(grad.data_ptr<scalar_t>(), n,
                   [scale](auto xv, auto yv) { return mse_loss_grad_math(xv, yv, decltype(xv)(scale)); }, x, y);
    }
    if (need_target) {
      grad_target = need_input ? cpu::empty_output(input.sizes(), input.options()) : grad;
      cpu::map_acc(grad_target.data_ptr<scalar_t>(), n, [](auto gv) { return decltype(gv)(0) - gv; },
                   grad.const_data_ptr<scalar_t>());
    }
  });
  if (need_input) grad_input = grad;
  return {grad_input, grad_target};
}

}  // namespace pyengine

// binary_cross_entropy_with_logits on the CPU. x (logits), y (targets), w (weight), pw (pos_weight): n elements,
// contiguous, one dtype; w and pw optional (1 when absent).
//   l_i = w_i * [(1 - y_i) x_i + (1 + (pw_i - 1) y_i) softplus(-x_i)]      reduced as mse_loss
//   dx_i = w_i * [(1 + (pw_i - 1) y_i) sigmoid(x_i) - pw_i y_i] * g        dy_i = w_i * [(pw_i - 1) softplus(-x_i) - x_i] * g
// with g = g_i (none) | g (sum) | g / n (mean). Formulas: bce_with_logits_*_math in common/math.h.
// forward_with_grad, the training forward of sum/mean: the loss and dx for g = 1 in one pass over x and y, both
// from one exponential, so that the backward only scales dx (or returns it, for the usual incoming 1).
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/ops/scalar_tensor.h>

#include "cpu/elementwise.h"
#include "ops.h"

namespace pyengine {
namespace {

using OptTensor = c10::optional<at::Tensor>;

const at::Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

void check_operands(const at::Tensor& input, const at::Tensor& target, const at::Tensor* weight,
                    const at::Tensor* pos_weight, const char* op) {
  check(input, "input", op).cpu().floating().contiguous();
  check(target, "target", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
  if (weight) check(*weight, "weight", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
  if (pos_weight)
    check(*pos_weight, "pos_weight", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
}

template <typename T> const T* data_or_null(const at::Tensor* t) { return t ? t->const_data_ptr<T>() : nullptr; }

// One pass over the elements for both gradients: each flag is a compile-time constant, so the loop carries
// only the loads it needs. `g` is per element (reduction none) or the single scale for sum/mean.
template <bool kWeight, bool kPosWeight, bool kPerElementGrad, typename scalar_t>
void bce_backward_loop(scalar_t* dx, scalar_t* dy, int64_t n, const scalar_t* x, const scalar_t* y,
                       const scalar_t* w, const scalar_t* pw, const scalar_t* g, acc_t<scalar_t> scale) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t V = at::vec::Vectorized<acc>::size();
  const auto step = [&](auto xv, auto yv, auto wv, auto pwv, auto gv, auto store_dx, auto store_dy) {
    const auto m = wv * gv;
    if (dx) store_dx(bce_with_logits_grad_input_math(xv, yv, pwv) * m);
    if (dy) store_dy(bce_with_logits_grad_target_math(xv, pwv) * m);
  };
  at::parallel_for(0, n, cpu::kElementwiseGrain, [&](int64_t begin, int64_t end) {
    using Vec = at::vec::Vectorized<acc>;
    int64_t i = begin;
    for (; i + V <= end; i += V) {
      step(cpu::load_acc(x + i), cpu::load_acc(y + i), kWeight ? cpu::load_acc(w + i) : Vec(acc(1)),
           kPosWeight ? cpu::load_acc(pw + i) : Vec(acc(1)), kPerElementGrad ? cpu::load_acc(g + i) : Vec(scale),
           [&](Vec v) { cpu::store_acc(dx + i, v); }, [&](Vec v) { cpu::store_acc(dy + i, v); });
    }
    for (; i < end; ++i) {
      step(acc(x[i]), acc(y[i]), kWeight ? acc(w[i]) : acc(1), kPosWeight ? acc(pw[i]) : acc(1),
           kPerElementGrad ? acc(g[i]) : scale, [&](acc v) { dx[i] = scalar_t(v); },
           [&](acc v) { dy[i] = scalar_t(v); });
    }
  });
}

}  // namespace

at::Tensor binary_cross_entropy_with_logits_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                        const OptTensor& weight_opt, const OptTensor& pos_weight_opt,
                                                        int64_t reduction) {
  const char* op = "binary_cross_entropy_with_logits_forward_cpu";
  const at::Tensor *weight = present(weight_opt), *pos_weight = present(pos_weight_opt);
  check_operands(input, target, weight, pos_weight, op);
  const Reduction red = check_reduction(reduction, op);
  const int64_t n = input.numel();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "binary_cross_entropy_with_logits_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto emit = [&](const auto& loss, auto... operands) {
      if (red == Reduction::None) {
        out = cpu::empty_output(input.sizes(), input.options());
        cpu::map_acc(out.data_ptr<scalar_t>(), n, loss, operands...);
      } else {
        acc total = cpu::sum_acc<scalar_t>(n, loss, operands...);
        if (red == Reduction::Mean) total /= static_cast<acc>(n);
        out = at::scalar_tensor(static_cast<double>(total), input.options());
      }
    };
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* y = target.const_data_ptr<scalar_t>();
    const scalar_t* w = data_or_null<scalar_t>(weight);
    const scalar_t* pw = data_or_null<scalar_t>(pos_weight);
    if (w && pw) {
      emit([](auto xv, auto yv, auto pwv, auto wv) { return bce_with_logits_loss_math(xv, yv, pwv) * wv; }, x, y, pw, w);
    } else if (w) {
      emit([](auto xv, auto yv, auto wv) { return bce_with_logits_loss_math(xv, yv, decltype(xv)(1)) * wv; }, x, y, w);
    } else if (pw) {
      emit([](auto xv, auto yv, auto pwv) { return bce_with_logits_loss_math(xv, yv, pwv); }, x, y, pw);
    } else {
      emit([](auto xv, auto yv) { return bce_with_logits_loss_math(xv, yv, decltype(xv)(1)); }, x, y);
    }
  });
  return out;
}

std::vector<at::Tensor> binary_cross_entropy_with_logits_forward_with_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const OptTensor& weight_opt, const OptTensor& pos_weight_opt,
    int64_t reduction) {
  const char* op = "binary_cross_entropy_with_logits_forward_with_grad_cpu";
  const at::Tensor *weight = present(weight_opt), *pos_weight = present(pos_weight_opt);
  check_operands(input, target, weight, pos_weight, op);
  const Reduction red = check_reduction(reduction, op);
  TORCH_CHECK(red != Reduction::None, op, ": reduction must be mean or sum (1 or 2), got none");
  const int64_t n = input.numel();
  at::Tensor loss, grad_input = cpu::empty_output(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "binary_cross_entropy_with_logits_forward_with_grad", [&] {
    using acc = acc_t<scalar_t>;
    // the backward's g for an incoming 1, and its multiplication order: dx is what backward(1) would give
    const acc scale = red == Reduction::Mean ? acc(1) / static_cast<acc>(n) : acc(1);
    scalar_t* dx = grad_input.data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* y = target.const_data_ptr<scalar_t>();
    const scalar_t* w = data_or_null<scalar_t>(weight);
    const scalar_t* pw = data_or_null<scalar_t>(pos_weight);
    const auto weighted = [scale](auto r, auto wv) {
      return LossAndGrad<decltype(wv)>{r.loss * wv, r.grad * (wv * decltype(wv)(scale))};
    };
    acc total;
    if (w && pw) {
      total = cpu::sum_and_map_acc(dx, n, [&](auto xv, auto yv, auto pwv, auto wv) {
        return weighted(bce_with_logits_loss_and_grad_math(xv, yv, pwv), wv);
      }, x, y, pw, w);
    } else if (w) {
      total = cpu::sum_and_map_acc(dx, n, [&](auto xv, auto yv, auto wv) {
        return weighted(bce_with_logits_loss_and_grad_math(xv, yv, decltype(xv)(1)), wv);
      }, x, y, w);
    } else if (pw) {
      total = cpu::sum_and_map_acc(dx, n, [&](auto xv, auto yv, auto pwv) {
        return weighted(bce_with_logits_loss_and_grad_math(xv, yv, pwv), decltype(xv)(1));
      }, x, y, pw);
    } else {
      total = cpu::sum_and_map_acc(dx, n, [&](auto xv, auto yv) {
        return weighted(bce_with_logits_loss_and_grad_math(xv, yv, decltype(xv)(1)), decltype(xv)(1));
      }, x, y);
    }
    if (red == Reduction::Mean) total /= static_cast<acc>(n);
    loss = at::scalar_tensor(static_cast<double>(total), input.options());
  });
  return {loss, grad_input};
}

std::vector<at::Tensor> binary_cross_entropy_with_logits_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target, const OptTensor& weight_opt,
    const OptTensor& pos_weight_opt, int64_t reduction, bool need_input, bool need_target) {
  const char* op = "binary_cross_entropy_with_logits_backward_cpu";
  const at::Tensor *weight = present(weight_opt), *pos_weight = present(pos_weight_opt);
  check_operands(input, target, weight, pos_weight, op);
  const Reduction red = check_reduction(reduction, op);
  check(grad_loss, "grad_loss", op).same_device(input).same_dtype(input)
      .sizes(red == Reduction::None ? input.sizes() : at::IntArrayRef{});
  at::Tensor grad_input = need_input ? cpu::empty_output(input.sizes(), input.options()) : at::Tensor();
  at::Tensor grad_target = need_target ? cpu::empty_output(input.sizes(), input.options()) : at::Tensor();
  if (!need_input && !need_target) return {grad_input, grad_target};
  const at::Tensor g = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "binary_cross_entropy_with_logits_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const int64_t n = input.numel();
    acc scale = 0;
    if (red != Reduction::None) scale = g.item().to<acc>() / (red == Reduction::Mean ? static_cast<acc>(n) : acc(1));
    scalar_t* dx = need_input ? grad_input.data_ptr<scalar_t>() : nullptr;
    scalar_t* dy = need_target ? grad_target.data_ptr<scalar_t>() : nullptr;
    const scalar_t* args[] = {input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
                              data_or_null<scalar_t>(weight), data_or_null<scalar_t>(pos_weight),
                              red == Reduction::None ? g.const_data_ptr<scalar_t>() : nullptr};
    const auto run = [&](auto has_w, auto has_pw, auto per_element) {
      bce_backward_loop<decltype(has_w)::value, decltype(has_pw)::value, decltype(per_element)::value>(
          dx, dy, n, args[0], args[1], args[2], args[3], args[4], scale);
    };
    using T = std::true_type;
    using F = std::false_type;
    const bool w = weight != nullptr, pw = pos_weight != nullptr, pe = red == Reduction::None;
    if (w && pw) pe ? run(T{}, T{}, T{}) : run(T{}, T{}, F{});
    else if (w) pe ? run(T{}, F{}, T{}) : run(T{}, F{}, F{});
    else if (pw) pe ? run(F{}, T{}, T{}) : run(F{}, T{}, F{});
    else pe ? run(F{}, F{}, T{}) : run(F{}, F{}, F{});
  });
  return {grad_input, grad_target};
}

}  // namespace pyengine

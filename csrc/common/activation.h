// The activation that linear can fuse after its product and bias, numbered as the `activation` argument of
// the linear kernels (pyengine/ops/linear.py ACTIVATIONS). Its own header so that both common/math.h (the
// formulas) and common/checks.h (the argument check) can name it without including each other.
#pragma once

#include <type_traits>

namespace pyengine {

enum class Activation : int { kNone = 0, kRelu = 1, kSigmoid = 2 };

template <Activation A> using ActivationConstant = std::integral_constant<Activation, A>;

// f(ActivationConstant<a>{}): turns the runtime code into a template argument, one instantiation each, so
// that the per-element loops carry no switch.
template <typename F> decltype(auto) dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::kRelu: return f(ActivationConstant<Activation::kRelu>{});
    case Activation::kSigmoid: return f(ActivationConstant<Activation::kSigmoid>{});
    default: return f(ActivationConstant<Activation::kNone>{});
  }
}

}  // namespace pyengine

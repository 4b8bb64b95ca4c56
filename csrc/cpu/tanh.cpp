// tanh on the CPU: y = tanh(x); dx = dy * (1 - y^2), from the saved output y.
// The formulas are tanh_forward_math / tanh_backward_math in common/math.h, shared with the CUDA kernels.
#include "cpu/elementwise.h"
#include "ops.h"

namespace pyengine {

at::Tensor tanh_forward_cpu(const at::Tensor& x) {
  return cpu::activation_forward(x, "tanh_forward_cpu", [](auto v) { return tanh_forward_math(v); });
}

at::Tensor tanh_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y) {
  return cpu::activation_backward(grad_y, y, "tanh_backward_cpu", FirstOperand::Grad,
                                  [](auto dy, auto yv) { return tanh_backward_math(dy, yv); });
}

}  // namespace pyengine

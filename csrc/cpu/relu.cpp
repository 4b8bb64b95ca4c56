// relu on the CPU: y = max(x, 0) (NaN stays NaN); dx = dy * (y > 0), from the saved output y.
// The formulas are relu_forward_math / relu_backward_math in common/math.h, shared with the CUDA kernels;
// float16/bfloat16 select their operands' bits instead (cpu::relu_forward_bits, relu_backward_bits), the same
// results without widening to float.
#include "cpu/elementwise.h"
#include "ops.h"

namespace pyengine {

at::Tensor relu_forward_cpu(const at::Tensor& x) {
  return cpu::activation_forward(x, "relu_forward_cpu", [](auto v) { return relu_forward_math(v); },
                                 [](auto t, const auto& v) { return cpu::relu_forward_bits<decltype(t)>(v); });
}

at::Tensor relu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y) {
  return cpu::activation_backward(grad_y, y, "relu_backward_cpu", FirstOperand::Saved,
                                  [](auto dy, auto yv) { return relu_backward_math(dy, yv); },
                                  [](auto t, const auto& dy, const auto& yv) {
                                    return cpu::relu_backward_bits<decltype(t)>(dy, yv);
                                  });
}

}  // namespace pyengine

// The memory layout torch gives an elementwise op's output, so that pyengine's outputs, and the gradients its
// backward kernels return, keep their inputs' memory format as torch's do: channels_last in, channels_last out.
// torch lays such outputs out in TensorIterator (aten/src/ATen/TensorIterator.cpp), by these rules:
//   - operands all of the output's shape and all contiguous: contiguous; all channels_last (4-D): channels_last;
//     all non-overlapping and dense with the same strides: those strides (fast_set_up);
//   - otherwise the dims are ordered by the operands' strides, the operands asked in order: the first one whose
//     strides over two dims differ decides between them (a broadcast dim, stride 0, tells nothing; of two dims
//     with equal strides the smaller goes inner), and the output is dense in that order (reorder_dimensions,
//     allocate_or_resize_outputs). Which operand comes first is the op's: torch.add lists input then other.
// The output is always dense, so a kernel writes it as a flat array, and reads flat any operand whose elements
// lie in the same order (same_layout).
#pragma once

#include <ATen/core/DimVector.h>
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace pyengine {

// Strides come back as at::DimVector, on the stack up to 5 dims: a contiguous input costs no allocation here.

// at::empty's row-major strides (a dim of size 0 counts as 1, so that every stride is positive).
inline at::DimVector contiguous_strides(at::IntArrayRef shape) {
  at::DimVector strides(shape.size());
  int64_t next = 1;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    strides[d] = next;
    next *= std::max<int64_t>(shape[d], 1);
  }
  return strides;
}

// TensorIterator's general rule (second point above): dense strides in the dim order the operands' strides give,
// each operand broadcast to `shape`. An insertion sort of the dims, innermost first, as reorder_dimensions does:
// a pair no operand orders stays as it is, and the scan goes on past it.
inline at::DimVector strides_in_operand_order(at::IntArrayRef shape, at::ArrayRef<at::Tensor> operands) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  c10::SmallVector<at::DimVector, 2> strides;  // per operand over shape's dims; 0 where it lacks or stretches one
  for (const at::Tensor& t : operands) {
    at::DimVector s(nd, 0);
    for (int64_t d = nd - t.dim(); d < nd; ++d) {
      const int64_t own = d - (nd - t.dim());
      s[d] = t.size(own) == 1 && shape[d] != 1 ? 0 : t.stride(own);
    }
    strides.push_back(std::move(s));
  }
  // > 0: dim a goes outside dim b; < 0: inside; 0: no operand tells
  const auto outside = [&](int64_t a, int64_t b) {
    for (const auto& s : strides) {
      if (s[a] == 0 || s[b] == 0) continue;
      if (s[a] != s[b]) return s[a] < s[b] ? -1 : 1;
      if (shape[a] > shape[b]) return 1;
    }
    return 0;
  };
  at::DimVector perm(nd);  // perm[0] the innermost dim, starting from row-major order
  std::iota(perm.rbegin(), perm.rend(), int64_t{0});
  for (int64_t i = 1; i < nd; ++i) {
    for (int64_t j = i - 1, moving = i; j >= 0; --j) {
      const int order = outside(perm[j], perm[moving]);
      if (order < 0) break;
      if (order > 0) {
        std::swap(perm[j], perm[moving]);
        moving = j;
      }
    }
  }
  bool row_major = true;
  for (int64_t i = 0; i < nd; ++i) row_major &= perm[i] == nd - 1 - i;
  if (row_major) return contiguous_strides(shape);
  // torch multiplies the sizes as they are here: after a dim of size 0 the strides are 0 (the tensor is empty)
  at::DimVector out(nd);
  int64_t next = 1;
  for (int64_t d : perm) {
    out[d] = next;
    next *= shape[d];
  }
  return out;
}

// The strides of torch's output for an elementwise op on `operands` (broadcast to `shape`), listed in the order
// the torch op hands them to TensorIterator.
inline at::DimVector elementwise_output_strides(at::IntArrayRef shape, at::ArrayRef<at::Tensor> operands) {
  bool same_shape = true, contiguous = true, channels_last = true, same_dense = true;
  for (const at::Tensor& t : operands) {
    same_shape &= t.sizes() == shape;
    contiguous &= t.is_contiguous();
    channels_last &= t.is_contiguous(at::MemoryFormat::ChannelsLast);
    same_dense &= t.is_non_overlapping_and_dense() && t.strides() == operands[0].strides();
  }
  if (same_shape && contiguous) return contiguous_strides(shape);
  if (same_shape && channels_last) {
    const std::vector<int64_t> strides = c10::get_channels_last_strides_2d(shape);
    return at::DimVector(strides.begin(), strides.end());
  }
  if (same_shape && same_dense) return at::DimVector(operands[0].strides());
  return strides_in_operand_order(shape, operands);
}

// Whether t's elements lie in memory as those of a dense tensor of t's shape with these strides would: then t's
// data, read as a flat array, is in that tensor's order. Dims of one element have no say.
inline bool same_layout(const at::Tensor& t, at::IntArrayRef strides) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != strides[d]) return false;
  return true;
}

// The dims of a dense layout with these strides from the outermost to the innermost (dims of one element, the
// only ones that can tie, in dim order): the order in which a kernel walking the output flat meets them.
inline at::DimVector dims_outermost_first(at::IntArrayRef strides) {
  at::DimVector order(strides.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return strides[a] != strides[b] ? strides[a] > strides[b] : a < b; });
  return order;
}

// v[order[0]], v[order[1]], ...
inline at::DimVector permuted(at::IntArrayRef v, at::IntArrayRef order) {
  at::DimVector out;
  for (int64_t d : order) out.push_back(v[d]);
  return out;
}

// The operand torch's own backward kernel hands TensorIterator first, whose layout wins where the incoming
// gradient's and the saved tensor's disagree: threshold_backward (relu's) and leaky_relu_backward list the saved
// tensor first, sigmoid_backward and tanh_backward the gradient.
enum class FirstOperand { Grad, Saved };

// The strides of torch's gradient for an activation's backward, from the gradient and the saved tensor.
inline at::DimVector activation_grad_strides(const at::Tensor& grad, const at::Tensor& saved, FirstOperand first) {
  return first == FirstOperand::Saved ? elementwise_output_strides(saved.sizes(), {saved, grad})
                                      : elementwise_output_strides(saved.sizes(), {grad, saved});
}

}  // namespace pyengine

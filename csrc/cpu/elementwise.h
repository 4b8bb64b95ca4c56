// Parallel, vectorized elementwise loops for the CPU kernels. `op` is a generic callable (a formula from
// common/math.h) applied to acc_t<scalar_t> scalars and to Vectorized<acc_t> vectors: float16/bfloat16
// lanes are widened to float, computed, and rounded back once, as torch does.
#pragma once

#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "cpu/allocator.h"

namespace pyengine {
namespace cpu {

using at::vec::Vectorized;

constexpr int64_t kElementwiseGrain = 32768;

template <typename scalar_t> constexpr bool is_reduced_float() {
  return std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
}

// out[i] = op(a[i]) for contiguous a, out of n elements; out may be a (each element is read before it is written).
template <typename scalar_t, typename Op>
void map_contiguous(scalar_t* out, const scalar_t* a, int64_t n, const Op& op) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    using Vec = Vectorized<scalar_t>;
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      Vec va = Vec::loadu(a + i);
      if constexpr (is_reduced_float<scalar_t>()) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(va);
        at::vec::convert_from_float<scalar_t>(op(lo), op(hi)).store(out + i);
      } else {
        op(va).store(out + i);
      }
    }
    for (; i < end; ++i) out[i] = static_cast<scalar_t>(op(static_cast<acc>(a[i])));
  });
}

// out[i] = op(a[i], b[i]) for contiguous a and b.
template <typename scalar_t, typename Op>
void map_contiguous(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n, const Op& op) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    using Vec = Vectorized<scalar_t>;
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      Vec va = Vec::loadu(a + i), vb = Vec::loadu(b + i);
      if constexpr (is_reduced_float<scalar_t>()) {
        auto [alo, ahi] = at::vec::convert_to_float<scalar_t>(va);
        auto [blo, bhi] = at::vec::convert_to_float<scalar_t>(vb);
        at::vec::convert_from_float<scalar_t>(op(alo, blo), op(ahi, bhi)).store(out + i);
      } else {
        op(va, vb).store(out + i);
      }
    }
    for (; i < end; ++i) out[i] = static_cast<scalar_t>(op(static_cast<acc>(a[i]), static_cast<acc>(b[i])));
  });
}

// acc-typed vectors of Vectorized<acc_t>::size() elements, loaded from and stored to scalar_t memory.
template <typename scalar_t> Vectorized<acc_t<scalar_t>> load_acc(const scalar_t* p) {
  if constexpr (is_reduced_float<scalar_t>()) {
    return std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, Vectorized<float>::size())));
  } else {
    return Vectorized<scalar_t>::loadu(p);
  }
}
template <typename scalar_t> void store_acc(scalar_t* p, const Vectorized<acc_t<scalar_t>>& v) {
  if constexpr (is_reduced_float<scalar_t>()) {
    at::vec::convert_from_float<scalar_t>(v, Vectorized<float>(0.0f)).store(p, Vectorized<float>::size());
  } else {
    v.store(p);
  }
}

// out[i] = op(in[i]...) over n elements of any number of contiguous inputs, op taking acc values or vectors.
template <typename scalar_t, typename Op, typename... In>
void map_acc(scalar_t* out, int64_t n, const Op& op, const In*... in) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t V = Vectorized<acc>::size();
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V <= end; i += V) store_acc(out + i, op(load_acc(in + i)...));
    for (; i < end; ++i) out[i] = static_cast<scalar_t>(op(static_cast<acc>(in[i])...));
  });
}

// The sum of chunk_total(begin, end) over fixed chunks of kElementwiseGrain elements of [0, n), the chunks run in
// parallel and their totals added in order: the same result on every run and any number of threads.
template <typename acc, typename ChunkTotal>
acc sum_over_chunks(int64_t n, const ChunkTotal& chunk_total) {
  const int64_t chunks = (n + kElementwiseGrain - 1) / kElementwiseGrain;
  std::vector<acc> partial(static_cast<size_t>(chunks), acc(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kElementwiseGrain;
      partial[c] = chunk_total(begin, std::min(n, begin + kElementwiseGrain));
    }
  });
  acc total = 0;
  for (acc p : partial) total += p;
  return total;
}

// sum over i < n of op(in[i]...), in acc_t, chunk by chunk (sum_over_chunks).
template <typename scalar_t, typename Op, typename... In>
acc_t<scalar_t> sum_acc(int64_t n, const Op& op, const In*... in) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t V = Vectorized<acc>::size();
  return sum_over_chunks<acc>(n, [&](int64_t begin, int64_t end) {
    Vectorized<acc> lanes(acc(0));
    int64_t i = begin;
    for (; i + V <= end; i += V) lanes = lanes + op(load_acc(in + i)...);
    acc total = at::vec::vec_reduce_all<acc>([](const auto& a, const auto& b) { return a + b; }, lanes);
    for (; i < end; ++i) total += op(static_cast<acc>(in[i])...);
    return total;
  });
}

// sum_acc and map_acc in one pass: op(in[i]...) returns {loss, grad} (LossAndGrad); the losses are summed as
// sum_acc sums them (the same chunks, lanes and order, so the same total) and out[i] = grad.
template <typename scalar_t, typename Op, typename... In>
acc_t<scalar_t> sum_and_map_acc(scalar_t* out, int64_t n, const Op& op, const In*... in) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t V = Vectorized<acc>::size();
  return sum_over_chunks<acc>(n, [&](int64_t begin, int64_t end) {
    Vectorized<acc> lanes(acc(0));
    int64_t i = begin;
    for (; i + V <= end; i += V) {
      const auto r = op(load_acc(in + i)...);
      lanes = lanes + r.loss;
      store_acc(out + i, r.grad);
    }
    acc total = at::vec::vec_reduce_all<acc>([](const auto& a, const auto& b) { return a + b; }, lanes);
    for (; i < end; ++i) {
      const auto r = op(static_cast<acc>(in[i])...);
      total += r.loss;
      out[i] = static_cast<scalar_t>(r.grad);
    }
    return total;
  });
}

// An uninitialized output of shape with the given dense strides (layout.h), from the output cache: a dense
// layout holds the same elements as the contiguous block the cache hands out, only in another order.
inline at::Tensor empty_output(at::IntArrayRef shape, at::IntArrayRef strides, const at::TensorOptions& options) {
  at::Tensor t = empty_output(shape, options);
  if (t.strides() != strides) t.unsafeGetTensorImpl()->set_sizes_and_strides(shape, strides);
  return t;
}

// t's elements in the order of `like` (a dense tensor of t's shape): t itself when they already lie so, else a
// copy laid out as like (torch's strided copy kernel).
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return same_layout(t, like.strides()) ? t : empty_output(t.sizes(), like.strides(), t.options()).copy_(t);
}

// y = op(x) for an activation: any shape, y laid out as torch lays out a unary op's output (common/layout.h): a
// dense x's own layout (contiguous, channels_last, any permutation), else dense in x's dim order. Either way x's
// elements are then a flat array in y's order, or are copied into y to be one, and mapped in place.
template <typename Op> at::Tensor activation_forward(const at::Tensor& x, const char* name, const Op& op) {
  check(x, "x", name).cpu().floating();
  at::Tensor y = empty_output(x.sizes(), elementwise_output_strides(x.sizes(), {x}), x.options());
  const bool gathered = !same_layout(x, y.strides());
  if (gathered) y.copy_(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "activation_forward_cpu", [&] {
    const scalar_t* src = gathered ? y.const_data_ptr<scalar_t>() : x.const_data_ptr<scalar_t>();
    map_contiguous(y.data_ptr<scalar_t>(), src, x.numel(), op);
  });
  return y;
}

// dx = op(dy, saved) for an activation whose derivative is a function of its saved output (or input); dx laid
// out as torch's backward lays it out (`first`: common/layout.h), each operand read flat in that order, copied
// into it first when its elements lie otherwise (the gradient of a sum, expanded from one value, for one).
template <typename Op>
at::Tensor activation_backward(const at::Tensor& grad_y_in, const at::Tensor& saved_in, const char* name,
                               FirstOperand first, const Op& op) {
  check(saved_in, "saved tensor", name).cpu().floating();
  check(grad_y_in, "grad_y", name).same_device(saved_in).same_dtype(saved_in).sizes(saved_in.sizes());
  at::Tensor grad_x =
      empty_output(saved_in.sizes(), activation_grad_strides(grad_y_in, saved_in, first), saved_in.options());
  const at::Tensor grad_y = in_layout_of(grad_y_in, grad_x), saved = in_layout_of(saved_in, grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "activation_backward_cpu", [&] {
    map_contiguous(grad_x.data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
                   saved.numel(), op);
  });
  return grad_x;
}

}  // namespace cpu
}  // namespace pyengine

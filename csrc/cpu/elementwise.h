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

// float16/bfloat16 lanes as their int16 bit patterns, for relu, whose results are its operands' own values or 0:
// selecting bits needs no widening to float and no rounding back. bfloat16's rounding alone is ~16 instructions
// a vector: relu's backward over 4096x64 bfloat16 took 45 us that way, against 14 us for a copy of it.
// With m = v & 0x7fff (the bits without the sign): v > 0 as an int16 is a positive float, v >= 0 any float with
// the sign clear, m == 0 either zero, and m above inf's bits a NaN of either sign. So relu(x) keeps x where x < 0
// is false (x >= 0, -0 or NaN) and is +0 elsewhere, and relu's dx keeps dy where y <= 0 is false (y > 0 or NaN):
// relu_forward_math and relu_backward_math (common/math.h) lane by lane.
template <typename scalar_t> Vectorized<int16_t> inf_bits() {
  static_assert(is_reduced_float<scalar_t>());
  return Vectorized<int16_t>(std::is_same_v<scalar_t, at::BFloat16> ? 0x7f80 : 0x7c00);
}
template <typename scalar_t> Vectorized<int16_t> relu_forward_bits(const Vectorized<int16_t>& x) {
  const Vectorized<int16_t> m = x & Vectorized<int16_t>(0x7fff);
  return x & ((x > Vectorized<int16_t>(-1)) | (m == Vectorized<int16_t>(0)) | (m > inf_bits<scalar_t>()));
}
template <typename scalar_t>
Vectorized<int16_t> relu_backward_bits(const Vectorized<int16_t>& dy, const Vectorized<int16_t>& y) {
  const Vectorized<int16_t> m = y & Vectorized<int16_t>(0x7fff);
  return dy & ((y > Vectorized<int16_t>(0)) | (m > inf_bits<scalar_t>()));
}
template <typename scalar_t> Vectorized<int16_t> load_bits(const scalar_t* p) {
  return Vectorized<int16_t>::loadu(reinterpret_cast<const int16_t*>(p));
}
template <typename scalar_t> void store_bits(scalar_t* p, const Vectorized<int16_t>& v) {
  v.store(reinterpret_cast<int16_t*>(p));
}

// out[i] = op(in[i]...) over n elements of float16/bfloat16 inputs: the vector loop on their bits, through
// bits_op(scalar_t(), bits...) (the first argument names the type: [](auto t, auto x) { return
// relu_forward_bits<decltype(t)>(x); }), and the tail through op on acc values.
template <typename scalar_t, typename BitsOp, typename Op, typename... In>
void map_bits(scalar_t* out, int64_t n, const BitsOp& bits_op, const Op& op, const In*... in) {
  constexpr int64_t V = Vectorized<int16_t>::size();
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V <= end; i += V) store_bits(out + i, bits_op(scalar_t(), load_bits(in + i)...));
    for (; i < end; ++i) out[i] = static_cast<scalar_t>(op(static_cast<acc_t<scalar_t>>(in[i])...));
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
// half_bits: where given, float16/bfloat16 vectors go through it on their bits instead (map_bits's bits_op).
template <typename Op, typename HalfBits = std::nullptr_t>
at::Tensor activation_forward(const at::Tensor& x, const char* name, const Op& op,
                              const HalfBits& half_bits = nullptr) {
  check(x, "x", name).cpu().floating();
  at::Tensor y = empty_output(x.sizes(), elementwise_output_strides(x.sizes(), {x}), x.options());
  const bool gathered = !same_layout(x, y.strides());
  if (gathered) y.copy_(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "activation_forward_cpu", [&] {
    const scalar_t* src = gathered ? y.const_data_ptr<scalar_t>() : x.const_data_ptr<scalar_t>();
    if constexpr (is_reduced_float<scalar_t>() && !std::is_null_pointer_v<HalfBits>) {
      map_bits(y.data_ptr<scalar_t>(), x.numel(), half_bits, op, src);
    } else {
      map_contiguous(y.data_ptr<scalar_t>(), src, x.numel(), op);
    }
  });
  return y;
}

// dx = op(dy, saved) for an activation whose derivative is a function of its saved output (or input); dx laid
// out as torch's backward lays it out (`first`: common/layout.h), each operand read flat in that order, copied
// into it first when its elements lie otherwise (the gradient of a sum, expanded from one value, for one).
// half_bits: as activation_forward's.
template <typename Op, typename HalfBits = std::nullptr_t>
at::Tensor activation_backward(const at::Tensor& grad_y_in, const at::Tensor& saved_in, const char* name,
                               FirstOperand first, const Op& op, const HalfBits& half_bits = nullptr) {
  check(saved_in, "saved tensor", name).cpu().floating();
  check(grad_y_in, "grad_y", name).same_device(saved_in).same_dtype(saved_in).sizes(saved_in.sizes());
  at::Tensor grad_x =
      empty_output(saved_in.sizes(), activation_grad_strides(grad_y_in, saved_in, first), saved_in.options());
  const at::Tensor grad_y = in_layout_of(grad_y_in, grad_x), saved = in_layout_of(saved_in, grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "activation_backward_cpu", [&] {
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    const scalar_t *dy = grad_y.const_data_ptr<scalar_t>(), *kept = saved.const_data_ptr<scalar_t>();
    if constexpr (is_reduced_float<scalar_t>() && !std::is_null_pointer_v<HalfBits>) {
      map_bits(out, saved.numel(), half_bits, op, dy, kept);
    } else {
      map_contiguous(out, dy, kept, saved.numel(), op);
    }
  });
  return grad_x;
}

}  // namespace cpu
}  // namespace pyengine

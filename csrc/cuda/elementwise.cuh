// Elementwise maps on the GPU: out[i] = op(in_0[i], ..., in_{K-1}[i]) over n contiguous elements, with 128-bit
// vectorized loads and stores, grid-stride loops and 64-bit indexing. `op` is a functor over opmath_t values
// (a formula from common/math.h): float16/bfloat16 are widened to float, computed, and rounded once, as torch
// does; integers and bool compute in their own type.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>

#include <type_traits>
#include <utility>

#include "common/layout.h"
#include "cuda/common.cuh"

namespace pyengine {
namespace cuda {

template <typename T>
constexpr bool is_floating_v = std::is_floating_point_v<T> || std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// The type an elementwise op computes in: acc_t for floating types, the type itself for integers and bool.
template <typename T> using opmath_t = std::conditional_t<is_floating_v<T>, acc_t<T>, T>;

template <int V, typename T> __device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <int V, typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// K input pointers, passed by value.
template <typename T, int K> struct Inputs {
  const T* p[K];
};

template <typename scalar_t, typename Op, size_t... I>
__device__ __forceinline__ scalar_t apply_op(const Op& op, const opmath_t<scalar_t> (&x)[sizeof...(I)],
                                             std::index_sequence<I...>) {
  return static_cast<scalar_t>(op(x[I]...));
}

// out[i] = op(in[0][i], ...) for i < n. The body [head, head + n_vec * V) moves as V-element packs, aligned there
// for every pointer; the head [0, head) and the tail [head + n_vec * V, n) go one element at a time. V = 1 (no
// common alignment) is the scalar kernel.
template <int V, typename scalar_t, int K, typename Op>
__global__ void elementwise_kernel(scalar_t* __restrict__ out, Inputs<scalar_t, K> in, int64_t n, int64_t head,
                                   int64_t n_vec, Op op) {
  using opmath = opmath_t<scalar_t>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t v = tid; v < n_vec; v += stride) {
    const int64_t i = head + v * V;
    Pack<scalar_t, V> packs[K];
#pragma unroll
    for (int k = 0; k < K; ++k) packs[k] = load_pack<V>(in.p[k] + i);
    Pack<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      opmath x[K];
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = static_cast<opmath>(packs[k].v[j]);
      o.v[j] = apply_op<scalar_t>(op, x, std::make_index_sequence<K>{});
    }
    store_pack<V>(out + i, o);
  }
  const int64_t body_end = head + n_vec * V, rest = head + (n - body_end);
  for (int64_t r = tid; r < rest; r += stride) {
    const int64_t i = r < head ? r : body_end + (r - head);
    opmath x[K];
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = static_cast<opmath>(in.p[k][i]);
    out[i] = apply_op<scalar_t>(op, x, std::make_index_sequence<K>{});
  }
}

constexpr int kElementwiseThreads = 256;

// Launches elementwise_kernel on the current stream: vectorized when every pointer sits at the same offset
// from a 16-byte boundary (then a scalar head reaches the boundary), else the scalar kernel.
template <typename scalar_t, typename Op, typename... In>
void launch_elementwise(scalar_t* out, int64_t n, const Op& op, const In*... in) {
  static_assert((std::is_same_v<In, scalar_t> && ...), "inputs share the output's dtype");
  constexpr int K = sizeof...(In);
  constexpr int V = pack_size<scalar_t>();
  if (n == 0) return;
  const Inputs<scalar_t, K> inputs{{in...}};
  const uintptr_t mis = reinterpret_cast<uintptr_t>(out) % 16;
  const bool same = mis % sizeof(scalar_t) == 0 && ((reinterpret_cast<uintptr_t>(in) % 16 == mis) && ...);
  const cudaStream_t stream = current_stream();
  if (V > 1 && same) {
    const int64_t head = std::min<int64_t>(n, (16 - mis) % 16 / sizeof(scalar_t)), n_vec = (n - head) / V;
    const int64_t work = std::max<int64_t>(n_vec, head + (n - head - n_vec * V));
    elementwise_kernel<V><<<grid_stride_blocks(work, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
        out, inputs, n, head, n_vec, op);
  } else {
    elementwise_kernel<1><<<grid_stride_blocks(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
        out, inputs, n, int64_t(0), n, op);
  }
  PE_CUDA_CHECK_LAUNCH();
}

// t's elements in the order of `like` (a dense tensor of t's shape): t itself when they already lie so, else a
// copy laid out as like (torch's strided copy kernel).
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  return same_layout(t, like.strides()) ? t : at::empty_strided(t.sizes(), like.strides(), t.options()).copy_(t);
}

// y = op(x) for an activation: any shape, y laid out as torch lays out a unary op's output (common/layout.h): a
// dense x's own layout (contiguous, channels_last, any permutation), else dense in x's dim order. x is read as a
// flat array in y's order, copied into that order first when it is not dense (not into y itself: the kernel's
// output is __restrict__).
template <typename Op> at::Tensor activation_forward(const at::Tensor& x_in, const char* name, const Op& op) {
  check(x_in, "x", name).cuda().floating();
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty_strided(x_in.sizes(), elementwise_output_strides(x_in.sizes(), {x_in}), x_in.options());
  const at::Tensor x = in_layout_of(x_in, y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "activation_forward_cuda", [&] {
    launch_elementwise(y.data_ptr<scalar_t>(), x.numel(), op, x.const_data_ptr<scalar_t>());
  });
  return y;
}

// dx = op(dy, saved) for an activation whose derivative is a function of its saved output (or input); dx laid
// out as torch's backward lays it out (`first`: common/layout.h), each operand read flat in that order, copied
// into it first when its elements lie otherwise (the gradient of a sum, expanded from one value, for one).
template <typename Op>
at::Tensor activation_backward(const at::Tensor& grad_y_in, const at::Tensor& saved_in, const char* name,
                               FirstOperand first, const Op& op) {
  check(saved_in, "saved tensor", name).cuda().floating();
  check(grad_y_in, "grad_y", name).same_device(saved_in).same_dtype(saved_in).sizes(saved_in.sizes());
  const c10::cuda::CUDAGuard guard(saved_in.device());
  at::Tensor grad_x =
      at::empty_strided(saved_in.sizes(), activation_grad_strides(grad_y_in, saved_in, first), saved_in.options());
  const at::Tensor grad_y = in_layout_of(grad_y_in, grad_x), saved = in_layout_of(saved_in, grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "activation_backward_cuda", [&] {
    launch_elementwise(grad_x.data_ptr<scalar_t>(), saved.numel(), op, grad_y.const_data_ptr<scalar_t>(),
                       saved.const_data_ptr<scalar_t>());
  });
  return grad_x;
}

}  // namespace cuda
}  // namespace pyengine

// Broadcast add on the GPU.
//   forward:  out = input + alpha * other, shapes broadcast as in PyTorch (aligned from the right, a missing or
//             size-1 dim repeats), out of the broadcast shape laid out as torch.add lays it out (common/layout.h:
//             channels_last + channels_last or + a (C, 1, 1) bias stays channels_last; where the operands'
//             layouts disagree input's wins). Floating types compute fma(other, alpha, input) in acc_t and round
//             once; integers wrap; bool is input || (other && alpha).
//   backward: d operand = scale * (grad summed over the dims broadcasting added or stretched), of the operand's
//             shape (scale is 1 for input, alpha for other); deterministic sums in cuda/reduce.cuh. Contiguous
//             when it sums (torch's sum_to), laid out as grad when it does not (torch's grad * alpha).
// Both first collapse the dims, taken in the output's memory order (size-1 dims dropped, neighbours that every
// operand steps through as one dim merged), so same shapes and layouts become one vectorized loop, a bias over
// rows (a channels_last tensor's channel bias too) a (rows, cols) loop, and the rest a strided loop over at most
// kMaxDims dims.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <limits>
#include <vector>

#include "cuda/elementwise.cuh"
#include "cuda/reduce.cuh"
#include "ops.h"

namespace pyengine {
namespace {

using cuda::opmath_t;
using cuda::StridedDims;

// One element: fma in acc_t for floating types, wrapping arithmetic for integers, logical or for bool.
template <typename scalar_t, typename T = opmath_t<scalar_t>> __device__ __forceinline__ T add_one(T a, T b, T alpha) {
  if constexpr (std::is_same_v<scalar_t, bool>) {
    return a || (b && alpha);
  } else if constexpr (std::is_integral_v<scalar_t>) {
    using U = std::conditional_t<sizeof(scalar_t) <= 4, uint32_t, uint64_t>;  // unsigned: overflow wraps
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(alpha) * static_cast<U>(b));
  } else {
    return fma(b, alpha, a);
  }
}

template <typename acc> struct ScaleOp {
  acc scale;
  __device__ __forceinline__ acc operator()(acc g) const { return g * scale; }
};

template <typename scalar_t> struct AddOp {
  opmath_t<scalar_t> alpha;
  __device__ __forceinline__ opmath_t<scalar_t> operator()(opmath_t<scalar_t> a, opmath_t<scalar_t> b) const {
    return add_one<scalar_t>(a, b, alpha);
  }
};

// out (rows, cols) = full + alpha * bias, or bias + alpha * full when bias_first (the bias is `input`): full is
// contiguous (rows, cols), bias (cols) repeats over the rows; cols = 1 is a scalar operand. n = rows * cols.
// With V > 1 every pointer is 16-byte aligned and V divides cols (or cols = 1), so a pack never crosses a row.
template <int V, typename scalar_t>
__global__ void add_bias_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ full,
                                const scalar_t* __restrict__ bias, int64_t n, int64_t cols, bool bias_first,
                                opmath_t<scalar_t> alpha) {
  using opmath = opmath_t<scalar_t>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t n_vec = n / V;
  for (int64_t v = tid; v < n_vec; v += stride) {
    const int64_t i = v * V;
    const auto f = cuda::load_pack<V>(full + i);
    cuda::Pack<scalar_t, V> b;
    if (cols == 1) {
#pragma unroll
      for (int j = 0; j < V; ++j) b.v[j] = bias[0];
    } else {
      b = cuda::load_pack<V>(bias + i % cols);
    }
    cuda::Pack<scalar_t, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const opmath x = static_cast<opmath>(f.v[j]), y = static_cast<opmath>(b.v[j]);
      o.v[j] = static_cast<scalar_t>(bias_first ? add_one<scalar_t>(y, x, alpha) : add_one<scalar_t>(x, y, alpha));
    }
    cuda::store_pack<V>(out + i, o);
  }
  for (int64_t i = n_vec * V + tid; i < n; i += stride) {
    const opmath x = static_cast<opmath>(full[i]), y = static_cast<opmath>(bias[i % cols]);
    out[i] = static_cast<scalar_t>(bias_first ? add_one<scalar_t>(y, x, alpha) : add_one<scalar_t>(x, y, alpha));
  }
}

// out[i] = a[offset_a(i)] + alpha * b[offset_b(i)] for the n elements of out, offsets from the collapsed dims.
template <typename index_t, typename scalar_t>
__global__ void add_strided_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ a,
                                   const scalar_t* __restrict__ b, StridedDims<2, index_t> dims, index_t n,
                                   opmath_t<scalar_t> alpha) {
  using opmath = opmath_t<scalar_t>;
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t i = blockIdx.x * index_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    index_t off[2];
    dims.offsets(i, off);
    out[i] = static_cast<scalar_t>(add_one<scalar_t>(static_cast<opmath>(a[off[0]]), static_cast<opmath>(b[off[1]]), alpha));
  }
}

// Dims in row-major order (outermost first), with two operands' strides over each.
struct Collapsed {
  std::vector<int64_t> sizes;
  std::vector<std::array<int64_t, 2>> strides;
  int ndim() const { return static_cast<int>(sizes.size()); }
};

// Drops size-1 dims and merges each dim into the next inner one when both operands step through the two as
// through one dim (stride[d] == stride[d + 1] * size[d + 1]). No dims left means a single element.
Collapsed collapse(at::IntArrayRef sizes, at::IntArrayRef s0, at::IntArrayRef s1) {
  Collapsed c;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 1) continue;
    if (c.ndim() > 0 && c.strides.back()[0] == s0[d] * sizes[d] && c.strides.back()[1] == s1[d] * sizes[d]) {
      c.sizes.back() *= sizes[d];
      c.strides.back() = {s0[d], s1[d]};
      continue;
    }
    c.sizes.push_back(sizes[d]);
    c.strides.push_back({s0[d], s1[d]});
  }
  return c;
}

// t's strides over the dims of `shape` it broadcasts to: 0 where t lacks the dim or stretches a size-1 one.
at::DimVector broadcast_strides(const at::Tensor& t, at::IntArrayRef shape) {
  const int64_t lead = static_cast<int64_t>(shape.size()) - t.dim();
  at::DimVector s(shape.size(), 0);
  for (int64_t d = lead; d < static_cast<int64_t>(shape.size()); ++d)
    if (t.size(d - lead) != 1) s[d] = t.stride(d - lead);
  return s;
}

std::vector<int64_t> broadcast_shape(at::IntArrayRef a, at::IntArrayRef b, const char* op) {
  const int64_t n = std::max(a.size(), b.size()), pa = n - a.size(), pb = n - b.size();
  std::vector<int64_t> out(n);
  for (int64_t d = 0; d < n; ++d) {
    const int64_t sa = d < pa ? 1 : a[d - pa], sb = d < pb ? 1 : b[d - pb];
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, op, ": the shapes ", a, " and ", b,
                " do not broadcast (size ", sa, " vs ", sb, " at dim ", d, " of the broadcast shape)");
    out[d] = sa == 1 ? sb : sa;
  }
  return out;
}

// The collapsed dims of operand k (0 or 1) as a kernel argument, innermost dim first; only the dims `keep` picks.
template <int N, typename index_t, typename Keep>
StridedDims<N, index_t> to_dims(const Collapsed& c, std::array<int, N> operands, Keep keep) {
  StridedDims<N, index_t> dims;
  for (int d = c.ndim() - 1; d >= 0; --d) {
    if (!keep(d)) continue;
    dims.sizes[dims.ndim] = static_cast<index_t>(c.sizes[d]);
    for (int k = 0; k < N; ++k) dims.strides[k][dims.ndim] = static_cast<index_t>(c.strides[d][operands[k]]);
    ++dims.ndim;
  }
  return dims;
}

// Whether every index of out and offset into each operand fits in 31 bits, for 32-bit index arithmetic.
bool fits_int32(const Collapsed& c, int64_t n) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (n > kMax) return false;
  for (int k = 0; k < 2; ++k) {
    int64_t last = 0;
    for (int d = 0; d < c.ndim(); ++d) last += (c.sizes[d] - 1) * c.strides[d][k];
    if (last > kMax) return false;
  }
  return true;
}

template <typename scalar_t>
void launch_add(scalar_t* out, const scalar_t* a, const scalar_t* b, const Collapsed& c, int64_t n,
                opmath_t<scalar_t> alpha) {
  constexpr int V = cuda::pack_size<scalar_t>();
  const cudaStream_t stream = cuda::current_stream();
  const int threads = cuda::kElementwiseThreads;
  const int nd = c.ndim();
  if (nd == 0 || (nd == 1 && c.strides[0][0] == 1 && c.strides[0][1] == 1))  // same shape (or one element)
    return cuda::launch_elementwise(out, n, AddOp<scalar_t>{alpha}, a, b);

  // A contiguous operand `full` plus a bias repeated over its rows (or a scalar): out (rows, cols).
  int full_k = -1;  // which operand is the full one
  int64_t cols = 1;
  for (int k = 0; k < 2 && nd <= 2; ++k) {
    const bool full_inner = c.strides[nd - 1][k] == 1, bias_inner = c.strides[nd - 1][1 - k] == (nd == 1 ? 0 : 1);
    const bool full_outer = nd == 1 || c.strides[0][k] == c.sizes[1], bias_outer = nd == 1 || c.strides[0][1 - k] == 0;
    if (full_inner && bias_inner && full_outer && bias_outer) {
      full_k = k;
      cols = nd == 1 ? 1 : c.sizes[1];
      break;
    }
  }
  if (full_k >= 0) {
    const scalar_t* full = full_k == 0 ? a : b;
    const scalar_t* bias = full_k == 0 ? b : a;
    const bool vec = V > 1 && cuda::is_aligned(out, 16) && cuda::is_aligned(full, 16) &&
                     (cols == 1 || (cols % V == 0 && cuda::is_aligned(bias, 16)));
    const int64_t blocks = cuda::grid_stride_blocks(vec ? n / V + V : n, threads);
    if (vec) {
      add_bias_kernel<V><<<blocks, threads, 0, stream>>>(out, full, bias, n, cols, full_k == 1, alpha);
    } else {
      add_bias_kernel<1><<<blocks, threads, 0, stream>>>(out, full, bias, n, cols, full_k == 1, alpha);
    }
    PE_CUDA_CHECK_LAUNCH();
    return;
  }

  const auto all = [](int) { return true; };
  const int64_t blocks = cuda::grid_stride_blocks(n, threads);
  if (fits_int32(c, n)) {
    add_strided_kernel<<<blocks, threads, 0, stream>>>(out, a, b, to_dims<2, uint32_t>(c, {0, 1}, all),
                                                       static_cast<uint32_t>(n), alpha);
  } else {
    add_strided_kernel<<<blocks, threads, 0, stream>>>(out, a, b, to_dims<2, int64_t>(c, {0, 1}, all), n, alpha);
  }
  PE_CUDA_CHECK_LAUNCH();
}

}  // namespace

at::Tensor add_forward_cuda(const at::Tensor& input, const at::Tensor& other, const at::Scalar& alpha) {
  check(input, "input", "add_forward_cuda").cuda();
  check(other, "other", "add_forward_cuda").same_device(input).same_dtype(input);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(!alpha.isBoolean() || dtype == at::kBool, "add_forward_cuda: Boolean alpha only supported for ",
              "Boolean results.");
  TORCH_CHECK(at::isFloatingType(dtype) || alpha.isIntegral(true), "add_forward_cuda: for integral input tensors, ",
              "argument alpha must not be a floating point number.");
  const c10::cuda::CUDAGuard guard(input.device());
  const std::vector<int64_t> shape = broadcast_shape(input.sizes(), other.sizes(), "add_forward_cuda");
  at::Tensor out = at::empty_strided(shape, elementwise_output_strides(shape, {input, other}), input.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  // The dims outermost first in out's memory: out is contiguous over them in that order, as launch_add writes it.
  const at::DimVector order = dims_outermost_first(out.strides());
  const auto collapse_in_order = [&](const at::Tensor& a, const at::Tensor& b) {
    return collapse(permuted(shape, order), permuted(broadcast_strides(a, shape), order),
                    permuted(broadcast_strides(b, shape), order));
  };
  at::Tensor lhs = input, rhs = other;
  Collapsed c = collapse_in_order(lhs, rhs);
  if (c.ndim() > cuda::kMaxDims) {  // more alternating broadcast dims than a kernel argument holds: expand both
    lhs = cuda::in_layout_of(input.expand(shape), out);
    rhs = cuda::in_layout_of(other.expand(shape), out);
    c = collapse_in_order(lhs, rhs);
  }
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, dtype, "add_forward_cuda", [&] {
    using alpha_t = opmath_t<scalar_t>;
    // bool: any nonzero alpha keeps other, as bool(alpha) in the python reference
    const alpha_t a = std::is_same_v<scalar_t, bool> ? alpha_t(alpha.isBoolean() ? alpha.toBool() : alpha.toLong() != 0)
                                                     : alpha.to<alpha_t>();
    launch_add(out.data_ptr<scalar_t>(), lhs.const_data_ptr<scalar_t>(), rhs.const_data_ptr<scalar_t>(), c, n, a);
  });
  return out;
}

at::Tensor add_backward_cuda(const at::Tensor& grad, at::IntArrayRef shape, const at::Scalar& scale) {
  check(grad, "grad", "add_backward_cuda").cuda().floating();
  const int64_t nd = grad.dim(), lead = nd - static_cast<int64_t>(shape.size());
  TORCH_CHECK(lead >= 0, "add_backward_cuda: shape ", shape, " has more dims than grad ", grad.sizes());
  // The result's strides over grad's dims, 0 on the summed ones: collapse then merges only dims of one kind.
  std::vector<int64_t> out_strides(nd, 0);
  int64_t next = 1;
  for (int64_t d = nd - 1; d >= lead; --d) {
    TORCH_CHECK(shape[d - lead] == grad.size(d) || shape[d - lead] == 1, "add_backward_cuda: grad ", grad.sizes(),
                " does not broadcast from shape ", shape);
    if (shape[d - lead] == grad.size(d)) {
      out_strides[d] = next;
      next *= grad.size(d);
    }
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  if (grad.numel() == 0) return at::zeros(shape, grad.options());  // an empty sum is 0
  const Collapsed c = collapse(grad.sizes(), grad.strides(), out_strides);
  int summed_dims = 0;
  for (int d = 0; d < c.ndim(); ++d) summed_dims += c.strides[d][1] == 0;
  // torch's gradient is grad itself (grad * scale) when the shapes match, laid out by the general rule of
  // common/layout.h (the scalar is an operand of another shape): a dense grad's own layout; with dims to sum, even
  // only dims of one element, sum_to's contiguous sum.
  const bool same_shape = grad.sizes() == shape;
  if (summed_dims == 0 && scale.equal(1)) return same_shape ? grad : grad.reshape(shape).contiguous();

  at::Tensor out = same_shape ? at::empty_strided(shape, strides_in_operand_order(shape, {grad}), grad.options())
                              : at::empty(shape, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "add_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc s = scale.to<acc>();
    if (summed_dims == 0) {  // a copy times scale, grad read flat in out's order
      const at::Tensor g = cuda::in_layout_of(grad, out.view(grad.sizes()));
      cuda::launch_elementwise(out.data_ptr<scalar_t>(), g.numel(), ScaleOp<acc>{s}, g.const_data_ptr<scalar_t>());
      return;
    }
    TORCH_CHECK(summed_dims <= cuda::kMaxDims && c.ndim() - summed_dims <= cuda::kMaxDims, "add_backward_cuda: ",
                "more than ", cuda::kMaxDims, " alternating broadcast dims after collapsing grad ", grad.sizes());
    const auto kept = to_dims<1, int64_t>(c, {0}, [&](int d) { return c.strides[d][1] != 0; });
    const auto summed = to_dims<1, int64_t>(c, {0}, [&](int d) { return c.strides[d][1] == 0; });
    int64_t K = 1, R = 1;
    for (int d = 0; d < kept.ndim; ++d) K *= kept.sizes[d];
    for (int d = 0; d < summed.ndim; ++d) R *= summed.sizes[d];
    // Rows when the innermost dim is summed and long enough to fill a warp; columns (the general case) else.
    const bool inner_summed = c.strides.back()[1] == 0 && c.sizes.back() >= 32;
    cuda::sum_broadcast_dims(out.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), kept, summed, K, R,
                             inner_summed, s, grad);
  });
  return out;
}

}  // namespace pyengine

// linear_cross_entropy on the GPU: cross_entropy(x W^T + b, t) over chunks of rows, so the (N, V) logits never
// exist whole. The chunk loop and its GEMMs (at::addmm / at::mm on torch's current stream, in x's dtype: cuBLAS
// multiplies float16/bfloat16 into float sums) are common/linear_cross_entropy_chunks.h; this file is the row
// pass over one chunk's logits z (R, V), read and written in their dtype and computed in the accumulation type.
// Per row r, class target t (ignored rows: loss 0, gradient 0), smoothing eps:
//   lse = log sum_c exp(z_c),  loss = (1 - eps)(lse - z_t) + eps / V sum_c (lse - z_c)
//   dz_c = g (p_c - (1 - eps) [c == t] - eps / V),  p = exp(z - lse)         written over z, in place
// A block per row: each thread runs an online softmax over its classes (c = threadIdx.x + k blockDim.x), the
// block merges them (reduce.cuh), then the same threads overwrite the classes they read with dz. An
// out-of-range target trips a device assert, as torch's nll_loss does: a RuntimeError at the next sync.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/linear_cross_entropy_chunks.h"
#include "cuda/common.cuh"
#include "cuda/reduce.cuh"
#include "cuda/softmax_rows.cuh"
#include "ops.h"

namespace pyengine {
namespace cuda {
namespace {

constexpr int kRowThreads = 512;

// z (R, V) in place; target (R); lse, loss, kept, g (R) as LceMode describes. Grid: R blocks.
template <typename scalar_t, bool kSmooth, typename acc = acc_t<scalar_t>>
__global__ void __launch_bounds__(kRowThreads)
    linear_cross_entropy_rows_kernel(scalar_t* __restrict__ z, const int64_t* __restrict__ target,
                                     acc* __restrict__ lse, acc* __restrict__ loss, acc* __restrict__ kept,
                                     const acc* __restrict__ g, int64_t V, int64_t ignore_index, acc eps,
                                     LceMode mode) {
  __shared__ alignas(16) unsigned char raw[32 * sizeof(RowState<acc>)];
  const int64_t r = blockIdx.x;
  scalar_t* zr = z + r * V;
  int64_t t = target[r];
  if (t == ignore_index) {
    t = -1;
  } else {
    CUDA_KERNEL_ASSERT(t >= 0 && t < V);
    if (t < 0 || t >= V) t = -1;
  }
  const auto k1 = cross_entropy_index_coefs(acc(1), static_cast<acc>(V), eps, static_cast<acc>(V));
  acc row_lse;
  if (mode != LceMode::GradFromLse) {
    // before the merge's barrier: no thread has written the row yet
    const acc x_t = t >= 0 ? static_cast<acc>(zr[t]) : acc(0);
    RowState<acc> st;
#pragma unroll 1
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
      const acc zc = static_cast<acc>(zr[c]);
      if constexpr (kSmooth) row_add(st, zc, acc(1)); else online_softmax_add(st.sm, zc);
    }
    if constexpr (kSmooth) {
      const auto shfl = [](RowState<acc> s, int offset) { return row_shfl(s, offset); };
      const auto merge = [](RowState<acc> p, RowState<acc> q) { return row_merge(p, q); };
      st = block_merge_with(st, reinterpret_cast<RowState<acc>*>(raw), shfl, merge);
    } else {
      st.sm = block_softmax_merge(st.sm, reinterpret_cast<SoftmaxState<acc>*>(raw));
    }
    row_lse = online_softmax_lse(st.sm);
    if (threadIdx.x == 0) {
      // A +inf logit makes torch's log_softmax NaN for the whole row (its x - max is inf - inf): so here too.
      const acc log_sum = st.sm.max == std::numeric_limits<acc>::infinity() ? std::numeric_limits<acc>::quiet_NaN()
                                                                           : pe_log(st.sm.sum);
      const acc x_rel = x_t - row_shift(st.sm.max);
      lse[r] = row_lse;
      loss[r] = t >= 0 ? cross_entropy_index_loss(k1, log_sum, x_rel, static_cast<acc>(V), kSmooth ? st.b : acc(0))
                       : acc(0);
      kept[r] = t >= 0 ? acc(1) : acc(0);
    }
  } else {
    row_lse = lse[r];
  }
  if (mode == LceMode::Loss) return;
  const acc gr = mode == LceMode::GradFromLse ? g[r] : acc(1);
  using Coefs = CrossEntropyIndexCoefs<acc>;
  const Coefs k = t >= 0 ? Coefs{k1.target * gr, k1.row * gr, k1.smooth * gr} : Coefs{acc(0), acc(0), acc(0)};
#pragma unroll 1
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const acc p = pe_exp(static_cast<acc>(zr[c]) - row_lse);
    zr[c] = static_cast<scalar_t>(cross_entropy_index_grad(k, p, c == t, acc(1)));
  }
}

void linear_cross_entropy_rows_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                    const at::Tensor& loss, const at::Tensor& kept, const at::Tensor& g, LceMode mode,
                                    int64_t ignore_index, double eps) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  const int threads = static_cast<int>(std::clamp<int64_t>((V + 31) / 32 * 32, 32, kRowThreads));
  const bool from_lse = mode == LceMode::GradFromLse;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "linear_cross_entropy_rows_cuda",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(R), threads, 0, current_stream()>>>(
          logits.data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), lse.data_ptr<acc>(),
          from_lse ? nullptr : loss.data_ptr<acc>(), from_lse ? nullptr : kept.data_ptr<acc>(),
          from_lse ? g.const_data_ptr<acc>() : nullptr, V, ignore_index, static_cast<acc>(eps), mode);
      PE_CUDA_CHECK_LAUNCH();
    };
    if (eps > 0) launch(linear_cross_entropy_rows_kernel<scalar_t, true>);
    else launch(linear_cross_entropy_rows_kernel<scalar_t, false>);
  });
}

// With half-precision GEMMs (always here): the chunk's dW product and dz's column sums join the float32 sums
// through torch's kernels, which cast on the fly.
void add_cuda(const at::Tensor& sum, const at::Tensor& part) { sum.add_(part); }
void add_column_sums_cuda(const at::Tensor& sum, const at::Tensor& part) {
  sum.add_(part.sum(0, false, sum.scalar_type()));
}

at::Tensor empty_cuda(at::IntArrayRef shape, const at::TensorOptions& options) { return at::empty(shape, options); }

constexpr LceKernels kLceCuda{empty_cuda, linear_cross_entropy_rows_cuda, add_cuda, add_column_sums_cuda, nullptr};

}  // namespace
}  // namespace cuda

// x (N, H), weight (V, H), bias (V), target (N) -> {loss, lse (N), denom, dx (N, H), dweight (V, H), dbias (V)}
std::vector<at::Tensor> linear_cross_entropy_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias,
                                                          const at::Tensor& target, int64_t ignore_index,
                                                          int64_t reduction, double label_smoothing, bool need_x,
                                                          bool need_weight, bool need_bias, int64_t chunk_bytes) {
  const char* op = "linear_cross_entropy_forward_cuda";
  const Reduction red = check_reduction(reduction, op);
  const LceArgs a = check_linear_cross_entropy_args(x, weight, bias, target, ignore_index, label_smoothing, need_x,
                                                    need_weight, need_bias, chunk_bytes, true, op);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_cross_entropy_forward_impl(x, weight, bias, target, a, red, cuda::kLceCuda);
}

// grad_loss (N) -> {dx (N, H), dweight (V, H), dbias (V)} = the gradients of sum_r grad_loss_r loss_r
std::vector<at::Tensor> linear_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                                                           const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const at::Tensor& target, const at::Tensor& lse,
                                                           int64_t ignore_index, double label_smoothing, bool need_x,
                                                           bool need_weight, bool need_bias, int64_t chunk_bytes) {
  const char* op = "linear_cross_entropy_backward_cuda";
  const LceArgs a = check_linear_cross_entropy_args(x, weight, bias, target, ignore_index, label_smoothing, need_x,
                                                    need_weight, need_bias, chunk_bytes, true, op);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_cross_entropy_backward_impl(grad_loss, x, weight, bias, target, lse, a, cuda::kLceCuda, op);
}

}  // namespace pyengine

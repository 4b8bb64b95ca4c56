// Softmax cross-entropy on the GPU. logits x: (N, C, D) contiguous, class stride D; target t: (N, D) int64
// class indices, or y: (N, C, D) class probabilities; weight w: (C). For each row r = (n, d), over classes c:
//   lse  = log(sum_c exp(x_c))                                             saved for the backward, (N, D)
//   loss = (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)       class index t (0 where ignored)
//   loss = sum_c w_c y'_c (lse - x_c),  y' = (1 - eps) y + eps / C          class probabilities
//   dx_c = g ((1 - eps) w_t + eps / C sum w) p_c - g [c == t] (1 - eps) w_t - g eps / C w_c,  p = exp(x - lse)
//   dx_c = g (p_c sum_k w_k y'_k - w_c y'_c)
// g: the incoming gradient, over denom (the kept rows' sum of w_t, or N * D for probabilities) for 'mean'.
// The formulas are in common/math.h; the CPU kernel (cpu/cross_entropy.cpp) runs the same ones.
//
// The forward reads each logit once (online softmax: max and sum in one pass) and keeps one lse per row;
// the backward reads each logit once more and writes dx: the (N, C) softmax is never stored.
// D == 1: a row is contiguous; a warp per row for C <= kWarpRowMaxC, else a block per row, with 128-bit
// loads from the row's first 16-byte boundary on. D > 1: a block of kTileD x BY threads takes kTileD
// consecutive positions d (the lanes, so each class's loads are coalesced); its BY thread rows split the
// classes and merge through shared memory.
// 'mean' and 'sum' stay on the device and are deterministic: the row kernels write every row's loss and
// target weight to a temporary, two small kernels sum them in a fixed order and divide by denom; denom
// is a 0-dim device tensor that the backward reads on the device.
// An out-of-range target (not ignore_index, outside [0, C)) trips a device assert, as in torch's nll_loss:
// a RuntimeError at the next synchronization. Nothing is read at such an index: the assert comes first.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/cross_entropy_rows.cuh"
#include "cuda/reduce.cuh"
#include "ops.h"

namespace pyengine {
namespace cuda {
namespace {

using namespace cross_entropy;  // the row kernels and their constants (cuda/cross_entropy_rows.cuh)

constexpr int kLossSumThreads = 512;  // the 'mean'/'sum' reduction kernels
constexpr int64_t kMaxSumBlocks = 1024;

// w_sum = sum_c w_c, for label smoothing with class weights (kept on the device). One block.
template <typename scalar_t>
__global__ void __launch_bounds__(kLossSumThreads) cross_entropy_weight_sum_kernel(const scalar_t* w, int64_t C,
                                                                               acc_t<scalar_t>* w_sum) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[32];
  acc s = acc(0);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += static_cast<acc>(w[c]);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) *w_sum = s;
}

// 'mean'/'sum', stage 1: block b sums rows [b chunk, (b + 1) chunk) of the per-row losses and target weights
// (w: nullptr for probability targets) in double, into part[b] and part[gridDim.x + b]. Fixed order.
template <typename acc>
__global__ void __launch_bounds__(kLossSumThreads) cross_entropy_partial_sum_kernel(const acc* loss, const acc* w,
                                                                                int64_t rows, int64_t chunk,
                                                                                double* part) {
  __shared__ double scratch[32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk, end = std::min(rows, begin + chunk);
  double sl = 0, sw = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    sl += static_cast<double>(loss[i]);
    if (w) sw += static_cast<double>(w[i]);
  }
  sl = block_sum(sl, scratch);
  sw = block_sum(sw, scratch);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = sl;
    part[gridDim.x + blockIdx.x] = sw;
  }
}

// Stage 2, one block: total = sum of the `blocks` partials; denom = their weight sum (prob_denom = N D for
// probability targets); out = total ('sum') or total / denom ('mean': NaN when nothing counts); out is
// nullptr for 'none', which still gets denom.
template <typename scalar_t>
__global__ void __launch_bounds__(kLossSumThreads) cross_entropy_finish_sum_kernel(const double* part, int64_t blocks,
                                                                               bool prob, double prob_denom,
                                                                               int64_t reduction, scalar_t* out,
                                                                               acc_t<scalar_t>* denom) {
  using acc = acc_t<scalar_t>;
  __shared__ double scratch[32];
  double sl = 0, sw = 0;
  for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) {
    sl += part[i];
    sw += part[blocks + i];
  }
  sl = block_sum(sl, scratch);
  sw = block_sum(sw, scratch);
  if (threadIdx.x == 0) {
    const double den = prob ? prob_denom : sw;
    *denom = static_cast<acc>(den);
    if (out) *out = static_cast<scalar_t>(static_cast<acc>(reduction == 1 ? sl / den : sl));
  }
}

struct Config {
  int64_t N, C, D, ignore_index;
  Reduction reduction;
  double eps;
  bool prob, weighted;
};

Config check_args(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                  int64_t ignore_index, int64_t reduction, double label_smoothing, const char* op) {
  const Reduction red = check_reduction(reduction, op);
  check(logits, "logits", op).cuda().floating().dim(3).contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  const bool prob = target.defined() && target.is_floating_point();
  if (prob)
    check(target, "target", op).same_device(logits).same_dtype(logits).sizes(logits.sizes()).contiguous();
  else
    check(target, "target", op).same_device(logits).dtype(at::kLong).sizes({N, D}).contiguous();
  const bool weighted = weight.has_value() && weight->defined();
  if (weighted) check(*weight, "weight", op).same_device(logits).same_dtype(logits).sizes({C}).contiguous();
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  return {N, C, D, ignore_index, red, std::max(label_smoothing, 0.0), prob, weighted};
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Calls f(std::integral_constant<Target, kind>) for the target kind of the call.
template <typename F> void with_target(const Config& cfg, const F& f) {
  if (cfg.prob) f(std::integral_constant<Target, Target::Prob>{});
  else if (cfg.eps > 0) f(std::integral_constant<Target, Target::IndexSmooth>{});
  else f(std::integral_constant<Target, Target::Index>{});
}

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Launches the forward (or backward) row or tile kernel over the N * D rows (at least one).
template <typename scalar_t, Target K>
void launch_rows(const Args<scalar_t>& a, bool backward, bool aligned) {
  const cudaStream_t stream = current_stream();
  const int64_t max_blocks = sm_count() * 32;  // grid-stride loops take the rest
  if (a.D == 1) {
    const bool warp_rows = a.C <= kWarpRowMaxC;
    const dim3 block = warp_rows ? dim3(32, kRowsPerBlock) : dim3(a.C <= 8192 ? 256 : kMaxRowThreads);
    const int64_t rows_per_block = warp_rows ? kRowsPerBlock : 1;
    const dim3 grid(static_cast<unsigned>(std::min((a.N + rows_per_block - 1) / rows_per_block, max_blocks)));
    // double: 8-byte loads already fill a warp's 256-byte transaction, and 2-wide packs interleave two
    // double exps, which spills in the weighted backward.
    constexpr int kVec = std::is_same_v<scalar_t, double> ? 1 : pack_size<scalar_t>();
    if (backward && aligned) cross_entropy_backward_rows_kernel<scalar_t, K, kVec><<<grid, block, 0, stream>>>(a);
    else if (backward) cross_entropy_backward_rows_kernel<scalar_t, K, 1><<<grid, block, 0, stream>>>(a);
    else if (aligned) cross_entropy_forward_rows_kernel<scalar_t, K, kVec><<<grid, block, 0, stream>>>(a);
    else cross_entropy_forward_rows_kernel<scalar_t, K, 1><<<grid, block, 0, stream>>>(a);
  } else {
    const int by = static_cast<int>(std::clamp<int64_t>(a.C / 4, 1, kMaxTileBY));
    const int64_t tiles = a.N * ((a.D + kTileD - 1) / kTileD);
    const dim3 block(kTileD, by), grid(static_cast<unsigned>(std::min(tiles, max_blocks)));
    if (backward) cross_entropy_backward_tile_kernel<scalar_t, K><<<grid, block, 0, stream>>>(a);
    else cross_entropy_forward_tile_kernel<scalar_t, K><<<grid, block, 0, stream>>>(a);
  }
  PE_CUDA_CHECK_LAUNCH();
}

// The weighted label-smoothing kinds need sum_c w_c: computed once on the device into a 0-dim tensor.
template <typename scalar_t>
at::Tensor weight_sum(const Config& cfg, const c10::optional<at::Tensor>& weight, const at::TensorOptions& acc_opts) {
  if (!cfg.weighted || cfg.prob || !(cfg.eps > 0)) return at::Tensor();
  at::Tensor w_sum = at::empty({}, acc_opts);
  cross_entropy_weight_sum_kernel<scalar_t><<<1, kLossSumThreads, 0, current_stream()>>>(
      weight->const_data_ptr<scalar_t>(), cfg.C, w_sum.data_ptr<acc_t<scalar_t>>());
  PE_CUDA_CHECK_LAUNCH();
  return w_sum;
}

template <typename scalar_t>
Args<scalar_t> make_args(const Config& cfg, const at::Tensor& logits, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& w_sum) {
  using acc = acc_t<scalar_t>;
  Args<scalar_t> a{};
  a.x = logits.const_data_ptr<scalar_t>();
  a.t = cfg.prob ? nullptr : target.const_data_ptr<int64_t>();
  a.y = cfg.prob ? target.const_data_ptr<scalar_t>() : nullptr;
  a.w = cfg.weighted ? weight->const_data_ptr<scalar_t>() : nullptr;
  a.w_sum = w_sum.defined() ? w_sum.const_data_ptr<acc>() : nullptr;
  a.N = cfg.N;
  a.C = cfg.C;
  a.D = cfg.D;
  a.ignore_index = cfg.ignore_index;
  a.reduction = static_cast<int64_t>(cfg.reduction);
  a.eps = static_cast<acc>(cfg.eps);
  return a;
}

}  // namespace
}  // namespace cuda

// logits (N, C, D), target (N, D) int64 or (N, C, D), weight (C) -> {loss ((N, D) or 0-dim), lse (N, D), denom}
std::vector<at::Tensor> cross_entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                   int64_t reduction, double label_smoothing) {
  using namespace cuda;
  const char* op = "cross_entropy_forward_cuda";
  const Config cfg = check_args(logits, target, weight, ignore_index, reduction, label_smoothing, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = cfg.N * cfg.D;
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  const bool none = cfg.reduction == Reduction::None;
  at::Tensor lse = at::empty({cfg.N, cfg.D}, acc_opts);
  at::Tensor denom = at::empty({}, acc_opts);
  at::Tensor loss = none ? at::empty({cfg.N, cfg.D}, logits.options()) : at::empty({}, logits.options());
  at::Tensor row_loss = at::empty({rows}, acc_opts);
  at::Tensor row_w = at::empty({cfg.prob ? 0 : rows}, acc_opts);
  const int64_t chunk = std::max<int64_t>(8 * kLossSumThreads, (rows + kMaxSumBlocks - 1) / kMaxSumBlocks);
  const int64_t blocks = (rows + chunk - 1) / chunk;
  at::Tensor part = at::empty({2 * std::max<int64_t>(blocks, 1)}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor w_sum = weight_sum<scalar_t>(cfg, weight, acc_opts);
    Args<scalar_t> a = make_args<scalar_t>(cfg, logits, target, weight, w_sum);
    a.lse = lse.data_ptr<acc>();
    a.row_loss = row_loss.data_ptr<acc>();
    a.row_w = cfg.prob ? nullptr : row_w.data_ptr<acc>();
    a.loss = none ? loss.data_ptr<scalar_t>() : nullptr;
    if (rows > 0) {
      const bool aligned = is_aligned(a.x, 16) && (!cfg.prob || is_aligned(a.y, 16));
      with_target(cfg, [&](auto kind) { launch_rows<scalar_t, decltype(kind)::value>(a, false, aligned); });
    }
    const cudaStream_t stream = current_stream();
    if (blocks > 0) {
      cross_entropy_partial_sum_kernel<acc><<<static_cast<unsigned>(blocks), kLossSumThreads, 0, stream>>>(
          a.row_loss, a.row_w, rows, chunk, part.data_ptr<double>());
      PE_CUDA_CHECK_LAUNCH();
    }
    cross_entropy_finish_sum_kernel<scalar_t><<<1, kLossSumThreads, 0, stream>>>(
        part.data_ptr<double>(), blocks, cfg.prob, static_cast<double>(rows), static_cast<int64_t>(cfg.reduction),
        none ? nullptr : loss.data_ptr<scalar_t>(), denom.data_ptr<acc>());
    PE_CUDA_CHECK_LAUNCH();
  });
  return {loss, lse, denom};
}

// dlogits (N, C, D) = (p - y') * w * grad_loss [/ denom], p = exp(logits - lse)
at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                       const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                                       const at::Tensor& denom, int64_t ignore_index, int64_t reduction,
                                       double label_smoothing) {
  using namespace cuda;
  const char* op = "cross_entropy_backward_cuda";
  const Config cfg = check_args(logits, target, weight, ignore_index, reduction, label_smoothing, op);
  check(lse, "lse", op).same_device(logits).dtype(acc_dtype(logits)).sizes({cfg.N, cfg.D}).contiguous();
  check(denom, "denom", op).same_device(logits).dtype(acc_dtype(logits)).dim(0);
  auto g_check = check(grad_loss, "grad_loss", op);
  g_check.same_device(logits).same_dtype(logits);
  if (cfg.reduction == Reduction::None) g_check.sizes({cfg.N, cfg.D}).contiguous();
  else g_check.dim(0);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  if (dx.numel() == 0) return dx;
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor w_sum = weight_sum<scalar_t>(cfg, weight, acc_opts);
    Args<scalar_t> a = make_args<scalar_t>(cfg, logits, target, weight, w_sum);
    a.lse_in = lse.const_data_ptr<acc>();
    a.grad = grad_loss.const_data_ptr<scalar_t>();
    a.denom = denom.const_data_ptr<acc>();
    a.dx = dx.data_ptr<scalar_t>();
    const bool aligned = is_aligned(a.x, 16) && is_aligned(a.dx, 16) && (!cfg.prob || is_aligned(a.y, 16));
    with_target(cfg, [&](auto kind) { launch_rows<scalar_t, decltype(kind)::value>(a, true, aligned); });
  });
  return dx;
}

// The training forward of 'mean'/'sum': the loss and its gradient for an incoming gradient of 1 (the CPU fuses
// the two passes; here they run one after the other).
std::vector<at::Tensor> cross_entropy_forward_with_grad_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                             const c10::optional<at::Tensor>& weight,
                                                             int64_t ignore_index, int64_t reduction,
                                                             double label_smoothing) {
  TORCH_CHECK(reduction == 1 || reduction == 2, "cross_entropy_forward_with_grad_cuda: reduction must be 1 (mean) ",
              "or 2 (sum), got ", reduction);
  auto out = cross_entropy_forward_cuda(logits, target, weight, ignore_index, reduction, label_smoothing);
  const at::Tensor one = at::ones({}, logits.options());
  return {out[0], cross_entropy_backward_cuda(one, logits, target, weight, out[1], out[2], ignore_index, reduction,
                                              label_smoothing), out[2]};
}

}  // namespace pyengine

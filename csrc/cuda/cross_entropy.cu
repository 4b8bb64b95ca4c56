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
#include "cuda/reduce.cuh"
#include "cuda/softmax_rows.cuh"
#include "ops.h"

namespace pyengine {
namespace cuda {
namespace {

enum class Target { Index, IndexSmooth, Prob };

constexpr int64_t kWarpRowMaxC = 1024;  // D == 1: a warp per row up to this many classes, else a block
constexpr int kRowsPerBlock = 8;        // warps (rows) per block when a warp takes a row
constexpr int kMaxRowThreads = 512;     // threads of a block that takes a row
constexpr int kTileD = 32;              // D > 1: positions per block (one warp wide)
constexpr int kMaxTileBY = 8;           // D > 1: thread rows splitting the classes
constexpr int kLossSumThreads = 512;        // the 'mean'/'sum' reduction kernels
constexpr int64_t kMaxSumBlocks = 1024;

// Everything a kernel needs, passed by value. Forward fills lse, row_loss, row_w (index targets) and, for
// 'none', loss; backward reads lse_in, grad, denom and writes dx.
template <typename scalar_t> struct Args {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;
  const int64_t* t;    // class targets (N, D), index kinds
  const scalar_t* y;   // probability targets (N, C, D), Prob
  const scalar_t* w;   // class weights (C), or nullptr
  const acc* w_sum;    // sum_c w_c on the device (weighted IndexSmooth), or nullptr: C
  int64_t N, C, D, ignore_index, reduction;
  acc eps;
  acc* lse;
  acc* row_loss;
  acc* row_w;
  scalar_t* loss;
  const acc* lse_in;
  const scalar_t* grad;
  const acc* denom;
  scalar_t* dx;

  __device__ __forceinline__ acc weight(int64_t c) const { return w ? static_cast<acc>(w[c]) : acc(1); }
  __device__ __forceinline__ acc total_weight() const { return w_sum ? *w_sum : static_cast<acc>(C); }
};

// Adds class c (logit xv, probability yv for Prob) to the thread's state.
template <Target K, typename scalar_t, typename acc = acc_t<scalar_t>>
__device__ __forceinline__ void add_class(RowState<acc>& st, const Args<scalar_t>& a, int64_t c, scalar_t xv,
                                          scalar_t yv) {
  const acc x = static_cast<acc>(xv);
  if constexpr (K == Target::Index) {
    online_softmax_add(st.sm, x);
  } else {
    acc v = a.weight(c);
    if constexpr (K == Target::Prob) v *= smoothed_probability(static_cast<acc>(yv), a.eps, static_cast<acc>(a.C));
    row_add(st, x, v);
  }
}

// Row r's target class, after checking it: -1 when ignored. An out-of-range target stops the kernel here.
template <typename scalar_t> __device__ __forceinline__ int64_t row_target(const Args<scalar_t>& a, int64_t r) {
  const int64_t t = a.t[r];
  if (t == a.ignore_index) return -1;
  CUDA_KERNEL_ASSERT(t >= 0 && t < a.C);
  return (t >= 0 && t < a.C) ? t : -1;
}

// Row r's lse, loss and target weight from its merged state; xr: class 0 of the row, classes `stride` apart.
template <Target K, typename scalar_t, typename acc = acc_t<scalar_t>>
__device__ void finish_row(const Args<scalar_t>& a, int64_t r, const scalar_t* xr, int64_t stride,
                           const RowState<acc>& st) {
  // A +inf logit makes torch's log_softmax NaN for the whole row (its x - max is inf - inf): so here too.
  const acc shift = row_shift(st.sm.max);
  const acc log_sum = st.sm.max == std::numeric_limits<acc>::infinity() ? std::numeric_limits<acc>::quiet_NaN()
                                                                        : pe_log(st.sm.sum);
  a.lse[r] = online_softmax_lse(st.sm);
  acc loss = acc(0), w_t = acc(1);
  if constexpr (K == Target::Prob) {
    loss = cross_entropy_prob_loss(st.vsum, log_sum, st.b);
  } else {
    const int64_t t = row_target(a, r);
    if (t < 0) {
      w_t = acc(0);
    } else {
      w_t = a.weight(t);
      const acc w_sum = a.total_weight();
      const auto k = cross_entropy_index_coefs(w_t, w_sum, a.eps, static_cast<acc>(a.C));
      const acc x_t = static_cast<acc>(xr[t * stride]) - shift;
      loss = cross_entropy_index_loss(k, log_sum, x_t, w_sum, K == Target::IndexSmooth ? st.b : acc(0));
    }
    a.row_w[r] = w_t;
  }
  a.row_loss[r] = loss;
  if (a.loss) a.loss[r] = static_cast<scalar_t>(loss);
}

// Row r's backward coefficients, times g: dx_c = p_c k.row - [c == t] k.target - k.smooth w_c (index; all 0
// for an ignored row, which leaves p * 0), or dx_c = g (p_c wy_sum - w_c y'_c) (Prob; wy_sum filled later).
template <typename acc> struct GradCoefs {
  CrossEntropyIndexCoefs<acc> k{acc(0), acc(0), acc(0)};
  int64_t t = -1;
  acc g = acc(0);
  acc wy_sum = acc(0);
};

template <Target K, typename scalar_t, typename acc = acc_t<scalar_t>>
__device__ __forceinline__ GradCoefs<acc> grad_coefs(const Args<scalar_t>& a, int64_t r) {
  GradCoefs<acc> gc;
  gc.g = static_cast<acc>(a.grad[a.reduction == 0 ? r : 0]);
  if (a.reduction == 1) gc.g /= *a.denom;
  if constexpr (K != Target::Prob) {
    gc.t = row_target(a, r);
    if (gc.t >= 0) {
      const auto k = cross_entropy_index_coefs(a.weight(gc.t), a.total_weight(), a.eps, static_cast<acc>(a.C));
      gc.k = {k.target * gc.g, k.row * gc.g, k.smooth * gc.g};
    }
  }
  return gc;
}

template <Target K, typename scalar_t, typename acc = acc_t<scalar_t>>
__device__ __forceinline__ acc grad_class(const Args<scalar_t>& a, const GradCoefs<acc>& gc, int64_t c, acc p,
                                          scalar_t yv) {
  if constexpr (K == Target::Index) {
    return cross_entropy_index_grad(gc.k, p, c == gc.t, acc(0));
  } else if constexpr (K == Target::IndexSmooth) {
    return cross_entropy_index_grad(gc.k, p, c == gc.t, a.weight(c));
  } else {
    const acc ys = smoothed_probability(static_cast<acc>(yv), a.eps, static_cast<acc>(a.C));
    return cross_entropy_prob_grad(p, gc.wy_sum, a.weight(c), ys) * gc.g;
  }
}

// v = w_c y'_c of class c, summed over the row for the Prob backward.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
__device__ __forceinline__ acc prob_weight(const Args<scalar_t>& a, int64_t c, scalar_t yv) {
  return a.weight(c) * smoothed_probability(static_cast<acc>(yv), a.eps, static_cast<acc>(a.C));
}

template <int kVec, typename T> __device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

// Visits the classes [0, C) of a contiguous row whose class 0 is element `start` of a 16-byte aligned
// buffer: thread `lane` of `lanes` calls scalar(c) for the classes before the first kVec boundary and
// after the last, and pack(c) for each aligned pack [c, c + kVec) in between. kVec == 1: pack only.
template <int kVec, typename Scalar, typename PackFn>
__device__ __forceinline__ void visit_row(int64_t start, int64_t C, int lane, int lanes, Scalar scalar,
                                          PackFn pack) {
  const int64_t head = kVec == 1 ? 0 : std::min<int64_t>(C, (kVec - start % kVec) % kVec);
  const int64_t packs = (C - head) / kVec, tail = head + packs * kVec;
  // Not unrolled: an unrolled loop keeps its trip count live across the row's device-assert call, a spill.
#pragma unroll 1
  for (int64_t c = lane; c < head; c += lanes) scalar(c);
#pragma unroll 1
  for (int64_t i = lane; i < packs; i += lanes) pack(head + i * kVec);
#pragma unroll 1
  for (int64_t c = tail + lane; c < C; c += lanes) scalar(c);
}

// D == 1 forward: rows of C contiguous logits, a row per warp (blockDim (32, kRowsPerBlock)) or per block
// (blockDim (threads, 1)). Each lane runs an online softmax over its classes, the lanes merge, lane 0
// writes lse[r], the row's loss and target weight.
template <typename scalar_t, Target K, int kVec>
__global__ void __launch_bounds__(kMaxRowThreads) cross_entropy_forward_rows_kernel(const Args<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  __shared__ alignas(16) unsigned char raw[32 * sizeof(RowState<acc>)];
  const int lane = threadIdx.x, lanes = blockDim.x;
  const bool block_row = blockDim.x > 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const scalar_t* xr = a.x + row * a.C;
    const scalar_t* yr = K == Target::Prob ? a.y + row * a.C : nullptr;
    RowState<acc> st;
    visit_row<kVec>(
        row * a.C, a.C, lane, lanes,
        [&](int64_t c) { add_class<K>(st, a, c, xr[c], K == Target::Prob ? yr[c] : scalar_t(0)); },
        [&](int64_t c) {
          const Pack<scalar_t, kVec> xp = load_pack<kVec>(xr + c);
          Pack<scalar_t, kVec> yp;
          if constexpr (K == Target::Prob) yp = load_pack<kVec>(yr + c);
#pragma unroll
          for (int j = 0; j < kVec; ++j) add_class<K>(st, a, c + j, xp.v[j], K == Target::Prob ? yp.v[j] : scalar_t(0));
        });
    if constexpr (K == Target::Index) {
      auto* scratch = reinterpret_cast<SoftmaxState<acc>*>(raw);
      st.sm = block_row ? block_softmax_merge(st.sm, scratch) : warp_softmax_merge(st.sm);
    } else {
      auto* scratch = reinterpret_cast<RowState<acc>*>(raw);
      const auto shfl = [](RowState<acc> s, int offset) { return row_shfl(s, offset); };
      const auto merge = [](RowState<acc> p, RowState<acc> q) { return row_merge(p, q); };
      st = block_row ? block_merge_with(st, scratch, shfl, merge) : warp_merge_with(st, shfl, merge);
    }
    if (lane == 0) finish_row<K>(a, row, xr, 1, st);
  }
}

// D == 1 backward, same layout: dx_c from p_c = exp(x_c - lse[r]) and the row's coefficients, one pass
// (Prob first sums wy_sum = sum_c w_c y'_c over the row).
template <typename scalar_t, Target K, int kVec>
__global__ void __launch_bounds__(kMaxRowThreads) cross_entropy_backward_rows_kernel(const Args<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[32];
  const int lane = threadIdx.x, lanes = blockDim.x;
  const bool block_row = blockDim.x > 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < a.N;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const scalar_t* xr = a.x + row * a.C;
    const scalar_t* yr = K == Target::Prob ? a.y + row * a.C : nullptr;
    scalar_t* dxr = a.dx + row * a.C;
    GradCoefs<acc> gc = grad_coefs<K>(a, row);
    if constexpr (K == Target::Prob) {
      acc s = acc(0);
      visit_row<kVec>(
          row * a.C, a.C, lane, lanes, [&](int64_t c) { s += prob_weight(a, c, yr[c]); },
          [&](int64_t c) {
            const Pack<scalar_t, kVec> yp = load_pack<kVec>(yr + c);
#pragma unroll
            for (int j = 0; j < kVec; ++j) s += prob_weight(a, c + j, yp.v[j]);
          });
      gc.wy_sum = block_row ? block_sum(s, scratch) : warp_sum(s);
    }
    const acc lse = a.lse_in[row];
    visit_row<kVec>(
        row * a.C, a.C, lane, lanes,
        [&](int64_t c) {
          const acc p = pe_exp(static_cast<acc>(xr[c]) - lse);
          dxr[c] = static_cast<scalar_t>(grad_class<K>(a, gc, c, p, K == Target::Prob ? yr[c] : scalar_t(0)));
        },
        [&](int64_t c) {
          const Pack<scalar_t, kVec> xp = load_pack<kVec>(xr + c);
          Pack<scalar_t, kVec> yp, out;
          if constexpr (K == Target::Prob) yp = load_pack<kVec>(yr + c);
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const acc p = pe_exp(static_cast<acc>(xp.v[j]) - lse);
            out.v[j] = static_cast<scalar_t>(grad_class<K>(a, gc, c + j, p, K == Target::Prob ? yp.v[j] : scalar_t(0)));
          }
          *reinterpret_cast<Pack<scalar_t, kVec>*>(dxr + c) = out;
        });
  }
}

// D > 1 forward: blockDim (kTileD, BY); a tile is kTileD consecutive positions d of one n, lane x = d.
// Thread (x, y) runs the online softmax over classes y, y + BY, ... of its position (x[(n C + c) D + d]:
// consecutive lanes read consecutive addresses); thread row 0 merges the BY states in order and finishes.
template <typename scalar_t, Target K>
__global__ void __launch_bounds__(kTileD * kMaxTileBY) cross_entropy_forward_tile_kernel(const Args<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  __shared__ alignas(16) unsigned char raw[kMaxTileBY * kTileD * sizeof(RowState<acc>)];
  auto* states = reinterpret_cast<RowState<acc>*>(raw);
  const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
  const int64_t tiles_per_n = (a.D + kTileD - 1) / kTileD, tiles = a.N * tiles_per_n;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t n = tile / tiles_per_n, d = (tile % tiles_per_n) * kTileD + tx;
    const bool active = d < a.D;
    const int64_t base = n * a.C * a.D + d;  // class 0 of row (n, d)
    RowState<acc> st;
    if (active) {
      for (int64_t c = ty; c < a.C; c += by)
        add_class<K>(st, a, c, a.x[base + c * a.D], K == Target::Prob ? a.y[base + c * a.D] : scalar_t(0));
    }
    states[ty * kTileD + tx] = st;
    __syncthreads();
    if (ty == 0 && active) {
      for (int j = 1; j < by; ++j) {
        if constexpr (K == Target::Index) st.sm = online_softmax_merge(st.sm, states[j * kTileD + tx].sm);
        else st = row_merge(st, states[j * kTileD + tx]);
      }
      finish_row<K>(a, n * a.D + d, a.x + base, a.D, st);
    }
    __syncthreads();  // the next tile rewrites states
  }
}

// D > 1 backward, same layout: every thread computes its row's coefficients, then writes dx for its classes
// (Prob first sums wy_sum per position over the BY thread rows, in order, through shared memory).
template <typename scalar_t, Target K>
__global__ void __launch_bounds__(kTileD * kMaxTileBY) cross_entropy_backward_tile_kernel(const Args<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  __shared__ acc sums[kMaxTileBY * kTileD];
  const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
  const int64_t tiles_per_n = (a.D + kTileD - 1) / kTileD, tiles = a.N * tiles_per_n;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t n = tile / tiles_per_n, d = (tile % tiles_per_n) * kTileD + tx;
    const bool active = d < a.D;
    const int64_t base = n * a.C * a.D + d, r = n * a.D + d;
    GradCoefs<acc> gc;
    acc lse = acc(0);
    if (active) {
      gc = grad_coefs<K>(a, r);
      lse = a.lse_in[r];
    }
    if constexpr (K == Target::Prob) {
      acc s = acc(0);
      if (active)
        for (int64_t c = ty; c < a.C; c += by) s += prob_weight(a, c, a.y[base + c * a.D]);
      sums[ty * kTileD + tx] = s;
      __syncthreads();
      for (int j = 0; j < by; ++j) gc.wy_sum += sums[j * kTileD + tx];
      __syncthreads();  // the next tile rewrites sums
    }
    if (active) {
      for (int64_t c = ty; c < a.C; c += by) {
        const int64_t i = base + c * a.D;
        const acc p = pe_exp(static_cast<acc>(a.x[i]) - lse);
        a.dx[i] = static_cast<scalar_t>(grad_class<K>(a, gc, c, p, K == Target::Prob ? a.y[i] : scalar_t(0)));
      }
    }
  }
}

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

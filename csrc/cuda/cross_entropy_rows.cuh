// The row kernels of softmax cross-entropy on the GPU (cuda/cross_entropy.cu launches them and holds the math
// and the memory layout in its header comment): per-row state and its online-softmax update, the row's loss and
// backward coefficients, and the forward/backward kernels for D == 1 (a warp or a block per contiguous row) and
// D > 1 (tiles of kTileD positions). The CPU's counterpart is cpu/cross_entropy_rows.h.
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/reduce.cuh"
#include "cuda/softmax_rows.cuh"

namespace pyengine {
namespace cuda {
namespace cross_entropy {

enum class Target { Index, IndexSmooth, Prob };

constexpr int64_t kWarpRowMaxC = 1024;  // D == 1: a warp per row up to this many classes, else a block
constexpr int kRowsPerBlock = 8;        // warps (rows) per block when a warp takes a row
constexpr int kMaxRowThreads = 512;     // threads of a block that takes a row
constexpr int kTileD = 32;              // D > 1: positions per block (one warp wide)
constexpr int kMaxTileBY = 8;           // D > 1: thread rows splitting the classes

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

}  // namespace cross_entropy
}  // namespace cuda
}  // namespace pyengine

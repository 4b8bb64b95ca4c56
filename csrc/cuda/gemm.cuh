// Our tiled GEMM for the linear kernels:  C (M, N) = act(alpha * A @ Bt^T (+ bias[n])),  A (M, K), Bt (N, K).
// Both inputs are "(MN, K) operands": element (i, k) of an operand is, with its layout a template parameter,
//   k-contiguous:  p[i * ld + k]          (a row-major matrix, e.g. x or W)
//   mn-contiguous: p[i + k * ld]          (a transposed one, e.g. dY^T or x^T)
// so the three products of linear take their inputs as they are, without copies:
//   y  = x  @ W^T    A = x,     Bt = W        dx = dY @ W     A = dY,  Bt = W^T
//   dW = dY^T @ x    A = dY^T,  Bt = x^T
// C is row-major with row stride ldc. One kernel skeleton (gemm_kernel) stages (BM x BK) and (BN x BK) tiles
// global -> shared, double-buffered with cp.async (16-byte copies with zero-fill when the operand is
// aligned, predicated scalar loads otherwise), and a Math policy turns each staged pair into register
// accumulators:
//   SimtMath   float / double FFMA, TM x TN outputs per thread: exact float32 / float64 accumulation
//   Mma16Math  float16 / bfloat16 tensor cores, mma.sync m16n8k16 fed by ldmatrix, float32 accumulators
//   Tf32Math   float32 as TF32 on tensor cores, mma.sync m16n8k8 (only when torch allows TF32 matmuls)
// Split-K: block z covers k in [z * k_split, (z + 1) * k_split) and writes its partial product to
// C + z * M * N; the caller adds the partials in a fixed order (deterministic).
// Needs sm_80+ (cp.async, bf16 mma): the build's architectures are 8.0 and 9.0.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/common.cuh"

namespace pyengine {
namespace cuda {
namespace gemm {

template <typename T, typename OutT> struct GemmParams {
  const T* a;
  const T* b;        // Bt
  const T* bias;     // (N) or null
  OutT* c;
  int64_t M, N, K;
  int64_t lda, ldb, ldc;
  int64_t k_split;   // K range of one blockIdx.z
  acc_t<T> alpha;
  bool vec_a, vec_b; // 16-byte aligned base and ld: whole-vector cp.async copies are legal
  Activation activation = Activation::kNone;  // applied after the bias; never with split-K (partials)
};

// ---- PTX wrappers (sm_80+) ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies src_bytes (0..16) from global to shared memory and zero-fills the rest of the 16 bytes.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8. Without .trans lane l
// receives elements (l / 4, 2 (l % 4) + {0, 1}) of each matrix, with .trans elements (2 (l % 4) + {0, 1}, l / 4).
template <bool TRANS> __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)) : "memory");
  }
}

// d += a @ b on one m16n8k16 tile (f16 or bf16 inputs, f32 accumulators).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::Half>) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();
#endif
}

// d += a @ b on one m16n8k8 tile of TF32 inputs (float bit patterns rounded by to_tf32).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// ---- shared-memory tiles ----

// One staged operand tile of MN x BK elements, stored in its global orientation so that 16-byte copies
// need no transpose: k-contiguous as [MN][BK + PAD], mn-contiguous as [BK][MN + PAD]. The pads keep rows
// 16-byte aligned and spread the rows a warp reads over the banks (see each Math policy).
template <bool K_CONTIG, int MN, int BK, int PAD> struct Tile {
  static constexpr bool kKContig = K_CONTIG;
  static constexpr int kOuter = K_CONTIG ? MN : BK, kInner = K_CONTIG ? BK : MN;
  static constexpr int kLd = kInner + PAD, kElems = kOuter * kLd;
  template <typename T> __device__ __forceinline__ static const T* ptr(const T* s, int i, int k) {
    return K_CONTIG ? s + i * kLd + k : s + k * kLd + i;
  }
};

// Stages the tile at (mn0, k0) of an operand with `rows` rows (mn) and columns k < k_end; elements outside
// are zero, so they add nothing to the products. Every thread of the block takes part.
template <typename Tl, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t ld, int64_t mn0, int64_t rows, int64_t k0,
                                          int64_t k_end, bool vec) {
  const int64_t outer_left = Tl::kKContig ? rows - mn0 : k_end - k0;
  const int64_t inner_left = Tl::kKContig ? k_end - k0 : rows - mn0;
  const T* origin = Tl::kKContig ? g + mn0 * ld + k0 : g + k0 * ld + mn0;
  if (vec) {
    constexpr int V = 16 / sizeof(T), kVecs = Tl::kOuter * Tl::kInner / V;
    static_assert(Tl::kInner % V == 0 && (Tl::kLd * sizeof(T)) % 16 == 0, "16-byte aligned tile rows");
    for (int i = threadIdx.x; i < kVecs; i += THREADS) {
      const int r = i / (Tl::kInner / V), c = (i % (Tl::kInner / V)) * V;
      const int64_t n = r < outer_left ? std::min<int64_t>(std::max<int64_t>(inner_left - c, 0), V) : 0;
      cp_async_16(s + r * Tl::kLd + c, n > 0 ? origin + r * ld + c : origin, static_cast<int>(n * sizeof(T)));
    }
  } else {
    for (int i = threadIdx.x; i < Tl::kOuter * Tl::kInner; i += THREADS) {
      const int r = i / Tl::kInner, c = i % Tl::kInner;
      s[r * Tl::kLd + c] = (r < outer_left && c < inner_left) ? origin[r * ld + c] : T(0.0f);
    }
  }
}

// ---- Math policies: per-block accumulators over one staged (BM x BK), (BN x BK) pair ----

// SIMT: C tile BM x BN over (BM / TM) x (BN / TN) threads, thread (ty, tx) = (tid / (BN / TN), tid % (BN / TN))
// owns rows ty + i * (BM / TM) and columns tx + j * (BN / TN): the TM x TN outer product of a column of A
// and a row of B per k, in registers. Strided ownership keeps a warp's B reads in consecutive (mn-contiguous)
// or pad-spread (k-contiguous, at most 2-way conflicts) banks, its A reads to 2 broadcast addresses, and
// the epilogue's stores coalesced.
template <typename T, int BM_, int BN_, int BK_, int TM, int TN, int PAD> struct SimtMath {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kPadK = PAD, kPadMN = PAD;
  static constexpr int kCols = BN / TN, kRows = BM / TM, kThreads = kCols * kRows;
  using acc = acc_t<T>;
  struct Acc {
    acc v[TM][TN];
  };

  template <typename TA, typename TB> __device__ __forceinline__ static void compute(Acc& c, const T* sa, const T* sb) {
    const int tx = threadIdx.x % kCols, ty = threadIdx.x / kCols;
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      acc a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = static_cast<acc>(*TA::ptr(sa, ty + i * kRows, k));
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = static_cast<acc>(*TB::ptr(sb, tx + j * kCols, k));
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) c.v[i][j] = fma(a[i], b[j], c.v[i][j]);
    }
  }

  template <typename F> __device__ __forceinline__ static void for_each(const Acc& c, F f) {
    const int tx = threadIdx.x % kCols, ty = threadIdx.x / kCols;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) f(ty + i * kRows, tx + j * kCols, c.v[i][j]);
  }
};

// Tensor cores, float16 / bfloat16: C tile 128 x 128, BK 32, 8 warps as 2 (m) x 4 (n), warp tile 64 x 32 =
// 4 x 4 mma tiles of m16n8, two k16 steps per staged tile. Fragments (PTX ISA, mma.m16n8k16, g = lane / 4,
// t = lane % 4): a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..), a[3] = A(g+8, 2t+8..);
// b[0] = B(k = 2t..2t+1, n = g), b[1] = B(k = 2t+8.., n = g); c[0..1] = C(g, 2t..2t+1), c[2..3] = C(g+8, ..).
// One ldmatrix.x4 loads an A fragment as the 8x8 blocks (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15),
// or the B fragments of two n8 tiles as (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15); .trans when
// the tile is mn-contiguous (rows of k). Tile rows of 80 (k-contig) or 272 (mn-contig) bytes put the 8 row
// addresses of each 8x8 block in distinct bank groups.
template <typename T> struct Mma16Math {
  static constexpr int BM = 128, BN = 128, BK = 32, kPadK = 8, kPadMN = 8, kThreads = 256;
  static constexpr int WM = 64, WN = 32, MI = WM / 16, NI = WN / 8;
  struct Acc {
    float v[MI][NI][4];
  };

  // Fragment block (mn_base.. + 16, k_base.. + 16): lane's 8x8 block q = lane / 8 sits at (mn_off, k_off).
  template <typename Tl>
  __device__ __forceinline__ static void load_x4(uint32_t (&r)[4], const T* s, int mn, int k, int mn_off, int k_off) {
    const int row = threadIdx.x & 7;
    ldmatrix_x4<!Tl::kKContig>(r, Tl::kKContig ? Tl::ptr(s, mn + mn_off + row, k + k_off)
                                               : Tl::ptr(s, mn + mn_off, k + k_off + row));
  }

  template <typename TA, typename TB> __device__ __forceinline__ static void compute(Acc& c, const T* sa, const T* sb) {
    const int warp = threadIdx.x / 32, q = (threadIdx.x & 31) >> 3;
    const int wm = (warp >> 2) * WM, wn = (warp & 3) * WN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[MI][4], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) load_x4<TA>(a[mi], sa, wm + mi * 16, kk, (q & 1) * 8, (q >> 1) * 8);
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        uint32_t r[4];
        load_x4<TB>(r, sb, wn + nj * 16, kk, (q >> 1) * 8, (q & 1) * 8);
        b[2 * nj][0] = r[0], b[2 * nj][1] = r[1], b[2 * nj + 1][0] = r[2], b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_m16n8k16<T>(c.v[mi][ni], a[mi], b[ni]);
    }
  }

  template <typename F> __device__ __forceinline__ static void for_each(const Acc& c, F f) {
    const int warp = threadIdx.x / 32, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int wm = (warp >> 2) * WM, wn = (warp & 3) * WN;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(wm + mi * 16 + g + (e >> 1) * 8, wn + ni * 8 + 2 * t + (e & 1), c.v[mi][ni][e]);
  }
};

// Tensor cores, float32 as TF32: same block and warp tiling as Mma16Math, BK 16, k8 steps. Fragments (PTX
// ISA, mma.m16n8k8.tf32): a[0] = A(g, t), a[1] = A(g+8, t), a[2] = A(g, t+4), a[3] = A(g+8, t+4);
// b[0] = B(k = t, n = g), b[1] = B(k = t+4, n = g); C as above. Loaded element by element from shared
// memory: rows of 20 words (k-contig, address 20 g + t) or 136 words (mn-contig, 136 t + g) hit 32
// distinct banks.
struct Tf32Math {
  static constexpr int BM = 128, BN = 128, BK = 16, kPadK = 4, kPadMN = 8, kThreads = 256;
  static constexpr int WM = 64, WN = 32, MI = WM / 16, NI = WN / 8;
  using Acc = Mma16Math<float>::Acc;

  template <typename TA, typename TB>
  __device__ __forceinline__ static void compute(Acc& c, const float* sa, const float* sb) {
    const int warp = threadIdx.x / 32, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int wm = (warp >> 2) * WM, wn = (warp & 3) * WN;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      uint32_t a[MI][4], b[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int m = wm + mi * 16 + g;
        a[mi][0] = to_tf32(*TA::ptr(sa, m, kk + t));
        a[mi][1] = to_tf32(*TA::ptr(sa, m + 8, kk + t));
        a[mi][2] = to_tf32(*TA::ptr(sa, m, kk + t + 4));
        a[mi][3] = to_tf32(*TA::ptr(sa, m + 8, kk + t + 4));
      }
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        b[ni][0] = to_tf32(*TB::ptr(sb, wn + ni * 8 + g, kk + t));
        b[ni][1] = to_tf32(*TB::ptr(sb, wn + ni * 8 + g, kk + t + 4));
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_m16n8k8_tf32(c.v[mi][ni], a[mi], b[ni]);
    }
  }

  template <typename F> __device__ __forceinline__ static void for_each(const Acc& c, F f) {
    Mma16Math<float>::for_each(c, f);
  }
};

// ---- the kernel ----

// Block (x, y, z) computes C rows [x BM, +BM) x columns [y BN, +BN) over k in [z k_split, +k_split):
// stage tile kt + 1 with cp.async while the Math policy consumes tile kt (two shared buffers), then the
// epilogue c = act(alpha * acc (+ bias[n])) with edge predication, act applied in the accumulation type
// before the one rounding to T (a uniform branch: one kernel serves every activation). OutT is T, or acc_t<T>
// for split-K partials.
template <typename T, typename OutT, typename Math, bool A_KCONTIG, bool B_KCONTIG>
__global__ void __launch_bounds__(Math::kThreads) gemm_kernel(const GemmParams<T, OutT> p) {
  using TA = Tile<A_KCONTIG, Math::BM, Math::BK, A_KCONTIG ? Math::kPadK : Math::kPadMN>;
  using TB = Tile<B_KCONTIG, Math::BN, Math::BK, B_KCONTIG ? Math::kPadK : Math::kPadMN>;
  __shared__ alignas(16) unsigned char smem[2 * (TA::kElems + TB::kElems) * sizeof(T)];
  T* const sa = reinterpret_cast<T*>(smem);
  T* const sb = sa + 2 * TA::kElems;

  const int64_t m0 = int64_t(blockIdx.x) * Math::BM, n0 = int64_t(blockIdx.y) * Math::BN;
  const int64_t k_begin = int64_t(blockIdx.z) * p.k_split, k_end = std::min(p.K, k_begin + p.k_split);
  const int64_t k_tiles = k_end > k_begin ? (k_end - k_begin + Math::BK - 1) / Math::BK : 0;

  auto stage = [&](int buf, int64_t k0) {
    load_tile<TA, Math::kThreads>(sa + buf * TA::kElems, p.a, p.lda, m0, p.M, k0, k_end, p.vec_a);
    load_tile<TB, Math::kThreads>(sb + buf * TB::kElems, p.b, p.ldb, n0, p.N, k0, k_end, p.vec_b);
  };

  typename Math::Acc acc{};
  if (k_tiles > 0) stage(0, k_begin);
  cp_async_commit();
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt + 1 < k_tiles) stage((kt + 1) & 1, k_begin + (kt + 1) * Math::BK);
    cp_async_commit();  // possibly empty, so that wait<1> always means "tile kt has landed"
    cp_async_wait<1>();
    __syncthreads();
    Math::template compute<TA, TB>(acc, sa + (kt & 1) * TA::kElems, sb + (kt & 1) * TB::kElems);
    __syncthreads();  // buffer kt & 1 is refilled by the next iteration's stage
  }

  OutT* const c = p.c + int64_t(blockIdx.z) * p.M * p.N;
  Math::for_each(acc, [&](int i, int j, acc_t<T> v) {
    const int64_t m = m0 + i, n = n0 + j;
    if (m < p.M && n < p.N) {
      v *= p.alpha;
      if (p.bias) v += static_cast<acc_t<T>>(p.bias[n]);
      if (p.activation == Activation::kRelu) v = activation_forward_math<Activation::kRelu>(v);
      if (p.activation == Activation::kSigmoid) v = activation_forward_math<Activation::kSigmoid>(v);
      c[m * p.ldc + n] = static_cast<OutT>(v);
    }
  });
}

}  // namespace gemm
}  // namespace cuda
}  // namespace pyengine

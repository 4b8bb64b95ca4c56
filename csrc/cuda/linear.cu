// linear on the GPU, with our own GEMM (cuda/gemm.cuh). x: (M, K), weight: (N, K), bias: (N), act: none,
// relu or sigmoid (common/math.h)
//   y  = act(x @ W^T + b)  GEMM with the bias add and the activation fused into its epilogue
//   dz = dy * act'(y)      from the saved output y, computed inside the db column sum (dz = dy without act)
//   dx = dz @ W            GEMM, W read transposed in place
//   dW = dz^T @ x          GEMM, dz and x read transposed in place; split-K when the output is small
//   db = column sums of dz, a deterministic two-level reduction (no atomics)
// float16/bfloat16 run on tensor cores (float32 accumulate), float32 on FFMA (or TF32 tensor cores when
// torch.backends.cuda.matmul.allow_tf32 is set), float64 on DFMA.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/gemm.cuh"
#include "ops.h"

namespace pyengine {
namespace {

// One GEMM input as an (MN, K) operand (see gemm.cuh): pointer, layout, leading dimension.
struct Operand {
  at::Tensor holder;  // keeps a contiguous copy alive until the launch is queued
  const void* ptr;
  bool k_contig;
  int64_t ld;
};

// t (R, C) as an operand with (mn, k) = (r, c), or (c, r) when transposed. Row-major and column-major
// strides (any leading dimension: slices, t()) are read in place; anything else is copied contiguous.
Operand make_operand(const at::Tensor& t_in, bool transposed) {
  at::Tensor t = t_in;
  const int64_t R = t.size(0), C = t.size(1);
  bool row_major;
  int64_t ld;
  if (t.stride(1) == 1 || C == 1) {
    row_major = true, ld = R == 1 ? 0 : t.stride(0);  // a single row: ld is never used
  } else if (t.stride(0) == 1 || R == 1) {
    row_major = false, ld = t.stride(1);
  } else {
    t = t.contiguous();
    row_major = true, ld = C;
  }
  return {t, t.const_data_ptr(), row_major != transposed, ld};
}

// The same matrix read as (k, mn): only the layout flips.
Operand transpose(Operand o) {
  o.k_contig = !o.k_contig;
  return o;
}

constexpr int kColumnSumThreadsX = 32, kColumnSumThreadsY = 8;

// out[z * C + c] = sum of g(r, c) over the rows r of split z: [z * rows_per_split, +rows_per_split), where
// g = in[r * rs + c * cs]; with an activation A, g = in[..] * act'(y[r * C + c]) instead, also written to
// dz[r * C + c] (y, dz (R, C) contiguous): linear's dz and db in one pass over dy and y.
// Block (32, 8) over 32 columns of one split: thread (tx, ty) adds rows ty, ty + 8, ... of column tx, then
// the 8 partials of a column are added in ty order. Fixed order everywhere: bitwise deterministic.
template <Activation A, typename In, typename Out>
__global__ void column_sum_kernel(Out* __restrict__ out, const In* __restrict__ in, int64_t R, int64_t C, int64_t rs,
                                  int64_t cs, int64_t rows_per_split, const In* __restrict__ y, In* __restrict__ dz) {
  using acc = acc_t<In>;
  __shared__ acc partial[kColumnSumThreadsY][kColumnSumThreadsX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kColumnSumThreadsX + tx;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split, r1 = std::min(R, r0 + rows_per_split);
  acc s = acc(0);
  if (c < C)
    for (int64_t r = r0 + ty; r < r1; r += kColumnSumThreadsY) {
      acc g = static_cast<acc>(in[r * rs + c * cs]);
      if constexpr (A != Activation::kNone) {
        g = activation_backward_math<A>(g, static_cast<acc>(y[r * C + c]));
        dz[r * C + c] = static_cast<In>(g);
      }
      s += g;
    }
  partial[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int i = 1; i < kColumnSumThreadsY; ++i) s += partial[i][tx];
    out[int64_t(blockIdx.y) * C + c] = static_cast<Out>(s);
  }
}

template <Activation A, typename In, typename Out>
void launch_column_sum(Out* out, const In* in, int64_t R, int64_t C, int64_t rs, int64_t cs, int64_t rows_per_split,
                       int64_t splits, const In* y = nullptr, In* dz = nullptr) {
  const dim3 block(kColumnSumThreadsX, kColumnSumThreadsY);
  const dim3 grid(static_cast<unsigned>((C + kColumnSumThreadsX - 1) / kColumnSumThreadsX), static_cast<unsigned>(splits));
  column_sum_kernel<A, In, Out><<<grid, block, 0, cuda::current_stream()>>>(out, in, R, C, rs, cs, rows_per_split,
                                                                            y, dz);
  PE_CUDA_CHECK_LAUNCH();
}

// out (C) = column sums of the (R, C) matrix in[r * rs + c * cs]. Tall inputs are cut into row splits
// whose partial sums (accumulation type) are then summed by a second pass. With an activation A, the sums
// are of dz = in * act'(y), written to dz on the way (see column_sum_kernel).
template <typename In, typename Out, Activation A = Activation::kNone>
void column_sum(Out* out, const In* in, int64_t R, int64_t C, int64_t rs, int64_t cs, const at::TensorOptions& opts,
                const In* y = nullptr, In* dz = nullptr) {
  using acc = acc_t<In>;
  if (C == 0) return;
  const int64_t col_blocks = (C + kColumnSumThreadsX - 1) / kColumnSumThreadsX;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::min<int64_t>({(R + 511) / 512, std::max<int64_t>(1, 4 * sms / col_blocks), 65535});
  if (splits <= 1) return launch_column_sum<A, In, Out>(out, in, R, C, rs, cs, std::max<int64_t>(R, 1), 1, y, dz);
  const int64_t rows_per_split = (R + splits - 1) / splits;
  splits = (R + rows_per_split - 1) / rows_per_split;
  at::Tensor ws = at::empty({splits, C}, opts.dtype(c10::CppTypeToScalarType<acc>::value));
  launch_column_sum<A, In, acc>(ws.data_ptr<acc>(), in, R, C, rs, cs, rows_per_split, splits, y, dz);
  launch_column_sum<Activation::kNone, acc, Out>(out, ws.const_data_ptr<acc>(), splits, C, C, 1, splits, 1);
}

template <typename T, typename OutT, typename Math>
void launch_gemm(const cuda::gemm::GemmParams<T, OutT>& p, bool a_kc, bool b_kc, dim3 grid) {
  using namespace cuda::gemm;
  auto kernel = a_kc ? (b_kc ? gemm_kernel<T, OutT, Math, true, true> : gemm_kernel<T, OutT, Math, true, false>)
                     : (b_kc ? gemm_kernel<T, OutT, Math, false, true> : gemm_kernel<T, OutT, Math, false, false>);
  kernel<<<grid, Math::kThreads, 0, cuda::current_stream()>>>(p);
  PE_CUDA_CHECK_LAUNCH();
}

// c (M, N, row-major, contiguous) = act(a @ b^T (+ bias)) for operands a (M, K), b (N, K); M, N > 0.
// When the output has too few tiles to fill the GPU and K is long (dW of a large batch), K is split over
// blockIdx.z into partials of the accumulation type (float, or double) that column_sum adds in order
// (only without bias and activation, which the epilogue of a partial cannot apply).
template <typename T, typename Math>
void gemm_with(at::Tensor& c, const Operand& a, const Operand& b, const T* bias, Activation act, int64_t M, int64_t N,
               int64_t K) {
  using acc = acc_t<T>;
  const int64_t tiles_m = (M + Math::BM - 1) / Math::BM, tiles_n = (N + Math::BN - 1) / Math::BN;
  TORCH_CHECK(tiles_n <= 65535, "linear (cuda): ", N, " output columns exceed the GEMM grid");
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = tiles_m * tiles_n;
  int64_t splits = 1;
  if (bias == nullptr && act == Activation::kNone && tiles < sms)
    splits = std::min<int64_t>({(2 * sms + tiles - 1) / tiles, K / 256, 64});
  const int64_t k_split = splits > 1 ? (K + splits - 1) / splits : std::max<int64_t>(K, 1);
  const int64_t k_split_aligned = (k_split + Math::BK - 1) / Math::BK * Math::BK;
  splits = splits > 1 ? (K + k_split_aligned - 1) / k_split_aligned : 1;

  constexpr int V = 16 / sizeof(T);
  auto vec = [](const Operand& o) { return cuda::is_aligned(o.ptr, 16) && o.ld % V == 0; };
  const T* pa = static_cast<const T*>(a.ptr);
  const T* pb = static_cast<const T*>(b.ptr);
  const dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n), static_cast<unsigned>(splits));
  if (splits == 1) {
    const cuda::gemm::GemmParams<T, T> p{pa, pb, bias, c.data_ptr<T>(), M, N, K, a.ld, b.ld, N, k_split, acc(1),
                                         vec(a), vec(b), act};
    return launch_gemm<T, T, Math>(p, a.k_contig, b.k_contig, grid);
  }
  at::Tensor ws = at::empty({splits, M, N}, c.options().dtype(c10::CppTypeToScalarType<acc>::value));
  const cuda::gemm::GemmParams<T, acc> p{pa, pb, nullptr, ws.data_ptr<acc>(), M, N, K, a.ld, b.ld, N,
                                         k_split_aligned, acc(1), vec(a), vec(b)};
  launch_gemm<T, acc, Math>(p, a.k_contig, b.k_contig, grid);
  column_sum<acc, T>(c.data_ptr<T>(), ws.const_data_ptr<acc>(), splits, M * N, M * N, 1, c.options());
}

// The Math policy per dtype: tensor cores for half types, TF32 for float32 only when torch allows it.
template <typename T>
void run_gemm(at::Tensor& c, const Operand& a, const Operand& b, const T* bias, int64_t M, int64_t N, int64_t K,
              Activation act = Activation::kNone) {
  using namespace cuda::gemm;
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, double>) {
    gemm_with<T, SimtMath<double, 64, 64, 8, 4, 4, 2>>(c, a, b, bias, act, M, N, K);
  } else if constexpr (std::is_same_v<T, float>) {
    if (at::globalContext().allowTF32CuBLAS())
      gemm_with<T, Tf32Math>(c, a, b, bias, act, M, N, K);
    else
      gemm_with<T, SimtMath<float, 128, 128, 8, 8, 8, 4>>(c, a, b, bias, act, M, N, K);
  } else {
    gemm_with<T, Mma16Math<T>>(c, a, b, bias, act, M, N, K);
  }
}

void check_linear_operands(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check(x, "x", op).cuda().floating().dim(2);
  check(weight, "weight", op).dim(2).same_device(x).same_dtype(x);
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x and weight shapes cannot be multiplied (", x.size(0), "x",
              x.size(1), " and ", weight.size(1), "x", weight.size(0), ")");
}

}  // namespace

at::Tensor linear_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               int64_t activation) {
  check_linear_operands(x, weight, "linear_forward_cuda");
  const Activation act = check_activation(activation, "linear_forward_cuda");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    check(*bias, "bias", "linear_forward_cuda").same_device(x).same_dtype(x).sizes({N});
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_forward_cuda", [&] {
    run_gemm<scalar_t>(y, make_operand(x, false), make_operand(weight, false),
                   b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, M, N, K, act);
  });
  return y;
}

std::vector<at::Tensor> linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                             bool need_x, bool need_weight, bool need_bias, int64_t activation,
                                             const c10::optional<at::Tensor>& y_saved) {
  check_linear_operands(x, weight, "linear_backward_cuda");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check(grad_y, "grad_y", "linear_backward_cuda").same_device(x).same_dtype(x).sizes({M, N});
  const Activation act = check_activation(activation, "linear_backward_cuda");
  at::Tensor y;
  if (act != Activation::kNone) {
    TORCH_CHECK(y_saved.has_value() && y_saved->defined(), "linear_backward_cuda: an activation needs the saved y");
    check(*y_saved, "y", "linear_backward_cuda").same_device(x).same_dtype(x).sizes({M, N});
    y = y_saved->contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x, grad_weight, grad_bias, grad_z = grad_y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_backward_cuda", [&] {
    if (act != Activation::kNone) {  // dz and db in one pass; db is a by-product even when not asked for
      grad_z = at::empty({M, N}, x.options());
      at::Tensor db = at::empty({N}, x.options());
      dispatch_activation(act, [&](auto a) {
        column_sum<scalar_t, scalar_t, decltype(a)::value>(
            db.data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), M, N, grad_y.stride(0), grad_y.stride(1),
            x.options(), y.const_data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>());
      });
      if (need_bias) grad_bias = db;
    }
    const Operand dy = need_x || need_weight ? make_operand(grad_z, false) : Operand{};
    if (need_x) {  // (M, K) = dy (M, N) @ (W^T (K, N))^T
      grad_x = at::empty({M, K}, x.options());
      run_gemm<scalar_t>(grad_x, dy, make_operand(weight, true), nullptr, M, K, N);
    }
    if (need_weight) {  // (N, K) = dy^T (N, M) @ (x^T (K, M))^T
      grad_weight = at::empty({N, K}, x.options());
      run_gemm<scalar_t>(grad_weight, transpose(dy), make_operand(x, true), nullptr, N, K, M);
    }
    if (need_bias && act == Activation::kNone) {
      grad_bias = at::empty({N}, x.options());
      column_sum<scalar_t, scalar_t>(grad_bias.data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), M, N,
                                     grad_y.stride(0), grad_y.stride(1), x.options());
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace pyengine

// fused_mlp on the GPU: a whole MLP (widths <= 128) forward in one kernel, backward in one kernel plus a small
// fixed-order reduction of the weight gradients. The math is in common/fused_mlp.h.
//
// Each block takes tiles of kTileRows rows and keeps the tile's activations in shared memory (row-major,
// kTileRows x max width, in acc_t), computing layer after layer; weights are read from global memory (a few
// KB, they stay in L1/L2). Only x, the saved hidden outputs, y and the gradients cross DRAM. Written to be
// simple and plainly correct (one thread per output element, a plain dot product each), not tuned: no
// tensor cores, no register tiling.
//
// Determinism: the backward's block c handles tiles c, c + chunks, c + 2 chunks, ... (chunks depends on the
// shapes alone) and adds its weight-gradient sums into its own slice of a partials buffer, one thread per
// entry; a second kernel then sums the slices in chunk order. No atomics: the same bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "common/fused_mlp.h"
#include "cuda/common.cuh"
#include "ops.h"

namespace pyengine {
namespace {

using namespace fused_mlp;

constexpr int kThreads = 128;
// Rows per tile: the backward's three tiles of the widest layer (128) take 48 KB of shared memory.
template <typename acc> constexpr int tile_rows() { return sizeof(acc) == 4 ? 32 : 16; }
// Backward blocks (each owning a partials slice of every weight and bias): at most this many, and at most
// kMaxPartials floats of partials in all.
constexpr int64_t kMaxChunks = 1024;
constexpr int64_t kMaxPartials = int64_t(1) << 24;

// The layer table, passed by value and copied into shared memory by the kernels (indexed by the layer there).
// grad_weight/grad_bias and offset are the reduction kernel's: dW_l's entries start at offset[l] in a
// partials slice, db_l's follow.
template <typename scalar_t> struct LayerTable {
  int count;
  int max_width;
  int width[kMaxLayers + 1];
  const scalar_t* weight[kMaxLayers];
  const scalar_t* bias[kMaxLayers];
  scalar_t* hidden[kMaxLayers];  // a_1 .. a_{L-1}: written by the forward, read by the backward
  scalar_t* grad_weight[kMaxLayers];
  scalar_t* grad_bias[kMaxLayers];
  int64_t offset[kMaxLayers + 1];  // offset[count]: entries per slice
};

template <typename scalar_t>
__device__ void copy_table(const LayerTable<scalar_t>& from, LayerTable<scalar_t>& to) {
  if (threadIdx.x == 0) to = from;
  __syncthreads();
}

// tile[r][k] = src[(r0 + r) * n + k] for the tile's rows.
template <typename scalar_t, typename acc>
__device__ void load_tile(const scalar_t* src, int n, int64_t r0, int rows, int stride, acc* tile) {
  for (int i = threadIdx.x; i < rows * n; i += blockDim.x) {
    const int r = i / n, k = i - r * n;
    tile[r * stride + k] = static_cast<acc>(src[(r0 + r) * n + k]);
  }
}

// y = MLP(x) for tiles of rows: one block per tile. Layer l: out[r][j] = act(b[j] + sum_k W[j][k] in[r][k]),
// stored to hidden[l] (or y for the last layer) and kept for the next layer. Shared: two tiles.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fused_mlp_forward_kernel(const LayerTable<scalar_t> table, const scalar_t* __restrict__ x,
                             scalar_t* __restrict__ y, int64_t M, int act, int out_act) {
  using acc = acc_t<scalar_t>;
  constexpr int R = tile_rows<acc>();
  __shared__ LayerTable<scalar_t> t;
  extern __shared__ __align__(16) unsigned char smem[];
  copy_table(table, t);
  const int stride = t.max_width;
  acc* in = reinterpret_cast<acc*>(smem);
  acc* out = in + R * stride;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * R;
  const int rows = M - r0 < R ? static_cast<int>(M - r0) : R;
  load_tile(x, t.width[0], r0, rows, stride, in);
  __syncthreads();
  for (int l = 0; l < t.count; ++l) {
    const int n_in = t.width[l], n_out = t.width[l + 1];
    const scalar_t* W = t.weight[l];
    const bool last = l == t.count - 1;
    const int a = last ? out_act : act;
    scalar_t* dst = last ? y : t.hidden[l];
    for (int i = threadIdx.x; i < rows * n_out; i += blockDim.x) {
      const int r = i / n_out, j = i - r * n_out;
      acc z = static_cast<acc>(t.bias[l][j]);
      for (int k = 0; k < n_in; ++k) z += static_cast<acc>(W[j * n_in + k]) * in[r * stride + k];
      z = activate(z, a);
      out[r * stride + j] = z;
      dst[(r0 + r) * n_out + j] = static_cast<scalar_t>(z);
    }
    __syncthreads();
    acc* swap = in;
    in = out;
    out = swap;
  }
}

// The backward of tiles c, c + gridDim.x, ...; block c adds its weight and bias gradient sums into
// partials[c * entries ..]. Per tile: dz = dy * out_act'(y); then for l = L-1 .. 0, with A = a_l:
//   dW_l[j][k] += sum_r dz[r][j] A[r][k];  db_l[j] += sum_r dz[r][j];
//   da[r][k] = sum_j W_l[j][k] dz[r][j];   dz <- da * act'(A) (l > 0) or dx <- da (l = 0)
// Shared: three tiles (dz, da, A).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fused_mlp_backward_kernel(const LayerTable<scalar_t> table, const scalar_t* __restrict__ grad_y,
                              const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                              scalar_t* __restrict__ dx, acc_t<scalar_t>* __restrict__ partials, int64_t M, int act,
                              int out_act) {
  using acc = acc_t<scalar_t>;
  constexpr int R = tile_rows<acc>();
  __shared__ LayerTable<scalar_t> t;
  extern __shared__ __align__(16) unsigned char smem[];
  copy_table(table, t);
  const int stride = t.max_width, L = t.count;
  acc* dz = reinterpret_cast<acc*>(smem);
  acc* da = dz + R * stride;
  acc* A = da + R * stride;
  acc* part = partials == nullptr ? nullptr : partials + blockIdx.x * t.offset[L];
  const int64_t tiles = (M + R - 1) / R;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r0 = tile * R;
    const int rows = M - r0 < R ? static_cast<int>(M - r0) : R;
    const int n_last = t.width[L];
    for (int i = threadIdx.x; i < rows * n_last; i += blockDim.x) {
      const int r = i / n_last, j = i - r * n_last;
      const int64_t g = (r0 + r) * n_last + j;
      dz[r * stride + j] =
          activation_grad(static_cast<acc>(grad_y[g]), static_cast<acc>(y[g]), static_cast<int64_t>(out_act));
    }
    for (int l = L - 1; l >= 0; --l) {
      const int n_in = t.width[l], n_out = t.width[l + 1];
      const scalar_t* W = t.weight[l];
      __syncthreads();  // dz is complete; nobody reads A any more
      load_tile(l == 0 ? x : t.hidden[l - 1], n_in, r0, rows, stride, A);
      __syncthreads();
      if (part != nullptr) {
        for (int i = threadIdx.x; i < n_out * n_in; i += blockDim.x) {
          const int j = i / n_in, k = i - j * n_in;
          acc s = 0;
          for (int r = 0; r < rows; ++r) s += dz[r * stride + j] * A[r * stride + k];
          part[t.offset[l] + i] += s;
        }
        for (int j = threadIdx.x; j < n_out; j += blockDim.x) {
          acc s = 0;
          for (int r = 0; r < rows; ++r) s += dz[r * stride + j];
          part[t.offset[l] + n_out * n_in + j] += s;
        }
      }
      if (l == 0 && dx == nullptr) break;
      for (int i = threadIdx.x; i < rows * n_in; i += blockDim.x) {
        const int r = i / n_in, k = i - r * n_in;
        acc s = 0;
        for (int j = 0; j < n_out; ++j) s += static_cast<acc>(W[j * n_in + k]) * dz[r * stride + j];
        if (l == 0) {
          dx[(r0 + r) * n_in + k] = static_cast<scalar_t>(s);
        } else {
          da[r * stride + k] = activation_grad(s, A[r * stride + k], static_cast<int64_t>(act));
        }
      }
      __syncthreads();  // da is complete before it becomes dz
      acc* swap = dz;
      dz = da;
      da = swap;
    }
    __syncthreads();  // the next tile overwrites dz
  }
}

// grad[p] = sum over c of partials[c * entries + p], c in order; entry p goes to its layer's dW or db.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fused_mlp_reduce_kernel(const LayerTable<scalar_t> table, const acc_t<scalar_t>* __restrict__ partials,
                            int64_t chunks, bool need_weights, bool need_biases) {
  using acc = acc_t<scalar_t>;
  __shared__ LayerTable<scalar_t> t;
  copy_table(table, t);
  const int64_t entries = t.offset[t.count];
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < entries;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * entries + p];
    int l = 0;
    while (p >= t.offset[l + 1]) ++l;
    const int64_t i = p - t.offset[l], weights = static_cast<int64_t>(t.width[l]) * t.width[l + 1];
    if (i < weights) {
      if (need_weights) t.grad_weight[l][i] = static_cast<scalar_t>(s);
    } else if (need_biases) {
      t.grad_bias[l][i - weights] = static_cast<scalar_t>(s);
    }
  }
}

// Lets `kernel` take `smem` bytes of dynamic shared memory: the widest tiles take 48 KB, which with the static
// layer table is past the default limit.
template <typename Kernel> void allow_shared_memory(Kernel kernel, size_t smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

template <typename scalar_t>
LayerTable<scalar_t> make_table(const std::vector<int64_t>& widths, const std::vector<at::Tensor>& weights) {
  LayerTable<scalar_t> table{};
  table.count = static_cast<int>(weights.size());
  table.max_width = static_cast<int>(*std::max_element(widths.begin(), widths.end()));
  for (size_t i = 0; i < widths.size(); ++i) table.width[i] = static_cast<int>(widths[i]);
  for (int l = 0; l < table.count; ++l) {
    table.weight[l] = weights[l].const_data_ptr<scalar_t>();
    table.offset[l + 1] = table.offset[l] + widths[l + 1] * widths[l] + widths[l + 1];
  }
  return table;
}

std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace

std::vector<at::Tensor> fused_mlp_forward_cuda(const at::Tensor& x_in, const std::vector<at::Tensor>& weights_in,
                                               const std::vector<at::Tensor>& biases_in, int64_t activation,
                                               int64_t output_activation) {
  const char* op = "fused_mlp_forward_cuda";
  check(x_in, "x", op).cuda();
  const std::vector<int64_t> widths =
      check_network_call(x_in, weights_in, biases_in, activation, output_activation, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const std::vector<at::Tensor> weights = contiguous_all(weights_in), biases = contiguous_all(biases_in);
  const int64_t M = x.size(0), L = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> outputs{at::empty({M, widths.back()}, x.options())};
  for (int64_t l = 0; l + 1 < L; ++l) outputs.push_back(at::empty({M, widths[l + 1]}, x.options()));
  if (M == 0) return outputs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_mlp_forward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int R = tile_rows<acc>();
    LayerTable<scalar_t> table = make_table<scalar_t>(widths, weights);
    for (int64_t l = 0; l < L; ++l) {
      table.bias[l] = biases[l].const_data_ptr<scalar_t>();
      if (l + 1 < L) table.hidden[l] = outputs[l + 1].data_ptr<scalar_t>();
    }
    const size_t smem = 2 * R * table.max_width * sizeof(acc);
    allow_shared_memory(fused_mlp_forward_kernel<scalar_t>, smem);
    fused_mlp_forward_kernel<scalar_t><<<(M + R - 1) / R, kThreads, smem, cuda::current_stream()>>>(
        table, x.const_data_ptr<scalar_t>(), outputs[0].data_ptr<scalar_t>(), M, static_cast<int>(activation),
        static_cast<int>(output_activation));
    PE_CUDA_CHECK_LAUNCH();
  });
  return outputs;
}

std::vector<at::Tensor> fused_mlp_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                const std::vector<at::Tensor>& weights_in,
                                                const std::vector<at::Tensor>& hidden_in, const at::Tensor& y_in,
                                                int64_t activation, int64_t output_activation, bool need_x,
                                                bool need_weights, bool need_biases) {
  const char* op = "fused_mlp_backward_cuda";
  check(x_in, "x", op).cuda();
  const std::vector<int64_t> widths = check_network(x_in, weights_in, op);
  check_activation(activation, "activation", op);
  check_activation(output_activation, "output_activation", op);
  const int64_t M = x_in.size(0), L = static_cast<int64_t>(weights_in.size());
  check(grad_y_in, "grad_y", op).same_device(x_in).same_dtype(x_in).sizes({M, widths.back()});
  check(y_in, "y", op).same_device(x_in).same_dtype(x_in).sizes({M, widths.back()});
  TORCH_CHECK_VALUE(static_cast<int64_t>(hidden_in.size()) == L - 1, op, ": expected ", L - 1,
                    " saved hidden outputs, got ", hidden_in.size());
  for (int64_t l = 0; l + 1 < L; ++l) {
    check(hidden_in[l], "hidden", op).same_device(x_in).same_dtype(x_in).sizes({M, widths[l + 1]});
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous(), y = y_in.contiguous();
  const std::vector<at::Tensor> weights = contiguous_all(weights_in), hidden = contiguous_all(hidden_in);
  const bool need_params = need_weights || need_biases;

  std::vector<at::Tensor> outputs(1 + 2 * L);
  if (need_x) outputs[0] = at::empty({M, widths[0]}, x.options());
  for (int64_t l = 0; l < L; ++l) {
    if (need_weights) outputs[1 + l] = at::empty({widths[l + 1], widths[l]}, x.options());
    if (need_biases) outputs[1 + L + l] = at::empty({widths[l + 1]}, x.options());
  }
  if (M == 0) {  // no rows: the parameter gradients are sums over nothing
    for (int64_t i = 1; i < 1 + 2 * L; ++i) {
      if (outputs[i].defined()) outputs[i].zero_();
    }
    return outputs;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_mlp_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    constexpr int R = tile_rows<acc>();
    LayerTable<scalar_t> table = make_table<scalar_t>(widths, weights);
    for (int64_t l = 0; l < L; ++l) {
      if (l + 1 < L) table.hidden[l] = const_cast<scalar_t*>(hidden[l].const_data_ptr<scalar_t>());
      if (need_weights) table.grad_weight[l] = outputs[1 + l].data_ptr<scalar_t>();
      if (need_biases) table.grad_bias[l] = outputs[1 + L + l].data_ptr<scalar_t>();
    }
    const int64_t entries = table.offset[L], tiles = (M + R - 1) / R;
    const int64_t chunks = std::max<int64_t>(1, std::min({tiles, kMaxChunks, kMaxPartials / entries}));
    const at::Tensor partials = need_params
        ? at::zeros({chunks, entries}, x.options().dtype(c10::CppTypeToScalarType<acc>::value))
        : at::Tensor();
    const size_t smem = 3 * R * table.max_width * sizeof(acc);
    allow_shared_memory(fused_mlp_backward_kernel<scalar_t>, smem);
    fused_mlp_backward_kernel<scalar_t><<<chunks, kThreads, smem, cuda::current_stream()>>>(
        table, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        need_x ? outputs[0].data_ptr<scalar_t>() : nullptr, need_params ? partials.data_ptr<acc>() : nullptr, M,
        static_cast<int>(activation), static_cast<int>(output_activation));
    PE_CUDA_CHECK_LAUNCH();
    if (need_params) {
      fused_mlp_reduce_kernel<scalar_t>
          <<<cuda::grid_stride_blocks(entries, kThreads), kThreads, 0, cuda::current_stream()>>>(
              table, partials.const_data_ptr<acc>(), chunks, need_weights, need_biases);
      PE_CUDA_CHECK_LAUNCH();
    }
  });
  return outputs;
}

}  // namespace pyengine

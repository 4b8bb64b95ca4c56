// The shape every elementwise loss shares on the GPU (mse_loss, binary_cross_entropy_with_logits): a per-element
// loss l(i), either written out (reduction none) or summed deterministically on the device (sum, mean) in two
// passes: each block of a fixed-size grid sums its grid-stride share into partial[block], then one block adds
// the partials in a fixed order and divides by n for the mean. No atomics, no host synchronization; the
// incoming gradient of a reduced loss is read from device memory by the backward kernels.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "cuda/common.cuh"
#include "cuda/reduce.cuh"

namespace pyengine {
namespace cuda {

constexpr int kLossThreads = 256;
constexpr int kLossMaxBlocks = 1024;

// out[i] = l(i), i < n.
template <typename scalar_t, typename LossAt>
__global__ void loss_elementwise_kernel(scalar_t* __restrict__ out, int64_t n, LossAt loss) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<scalar_t>(loss(i));
}

// partial[block] = sum of l(i) over this block's grid-stride share of i < n.
template <typename acc, typename LossAt>
__global__ void loss_partial_sum_kernel(acc* __restrict__ partial, int64_t n, LossAt loss) {
  __shared__ acc scratch[32];
  acc sum = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    sum += loss(i);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// out[0] = (sum of partial[0..blocks)) / divisor, in one block. n = 0 gives 0 / 0 = NaN for the mean, as torch.
template <typename scalar_t, typename acc>
__global__ void loss_finish_kernel(scalar_t* __restrict__ out, const acc* __restrict__ partial, int blocks,
                                   acc divisor) {
  __shared__ acc scratch[32];
  acc sum = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) sum += partial[b];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(sum / divisor);
}

// The loss tensor of `like`'s dtype: like's shape for none, 0-dim for sum and mean.
template <typename scalar_t, typename LossAt>
at::Tensor launch_loss(const at::Tensor& like, Reduction red, LossAt loss) {
  using acc = acc_t<scalar_t>;
  const int64_t n = like.numel();
  const cudaStream_t stream = current_stream();
  if (red == Reduction::None) {
    at::Tensor out = at::empty_like(like, like.options().memory_format(at::MemoryFormat::Contiguous));
    if (n > 0) {
      loss_elementwise_kernel<<<grid_stride_blocks(n, kLossThreads), kLossThreads, 0, stream>>>(
          out.data_ptr<scalar_t>(), n, loss);
      PE_CUDA_CHECK_LAUNCH();
    }
    return out;
  }
  const int blocks = static_cast<int>(std::min<int64_t>(kLossMaxBlocks, std::max<int64_t>(1, grid_stride_blocks(n, kLossThreads))));
  at::Tensor partial = at::empty({blocks}, like.options().dtype(c10::CppTypeToScalarType<acc>::value));
  at::Tensor out = at::empty({}, like.options());
  loss_partial_sum_kernel<<<blocks, kLossThreads, 0, stream>>>(partial.data_ptr<acc>(), n, loss);
  PE_CUDA_CHECK_LAUNCH();
  const acc divisor = red == Reduction::Mean ? static_cast<acc>(n) : acc(1);
  loss_finish_kernel<<<1, kLossThreads, 0, stream>>>(out.data_ptr<scalar_t>(), partial.data_ptr<acc>(), blocks,
                                                     divisor);
  PE_CUDA_CHECK_LAUNCH();
  return out;
}

// The incoming gradient of element i: g[i] for none, else the single device value g[0] (times 1/n for mean).
template <typename scalar_t> struct LossGrad {
  const scalar_t* g;
  bool per_element;
  acc_t<scalar_t> scale;
  __device__ __forceinline__ acc_t<scalar_t> operator()(int64_t i) const {
    return static_cast<acc_t<scalar_t>>(g[per_element ? i : 0]) * scale;
  }
};

template <typename scalar_t> LossGrad<scalar_t> loss_grad(const at::Tensor& grad_loss, int64_t n, Reduction red) {
  using acc = acc_t<scalar_t>;
  return {grad_loss.const_data_ptr<scalar_t>(), red == Reduction::None,
          red == Reduction::Mean ? acc(1) / static_cast<acc>(n) : acc(1)};
}

}  // namespace cuda
}  // namespace pyengine

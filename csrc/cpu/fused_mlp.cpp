// fused_mlp on the CPU: a whole MLP (widths <= 128) forward or backward in one call. The math is in
// common/fused_mlp.h. Rows go through in blocks of kBlockRows; a block's activations of every layer stay in a
// few feature-major buffers (feature k of the block at buf[k * kBlockRows .. + kBlockRows]) in L1/L2, so each
// layer is a short loop of multiply-adds over kBlockRows contiguous rows, vectorized whatever the widths, and
// nothing but x, the saved hidden outputs and y crosses memory. The backward also copies each layer's input
// rows row-major, the layout in which the weight gradient accumulates without horizontal sums.
//
// Weight gradients are summed per chunk of rows (a chunk is a whole number of blocks; the split depends on M
// alone) into per-chunk partials, then the partials are added in chunk order: the same result on every run
// and with any number of threads.
//
// Networks with enough work (kLayerGemmMinMacs) in float32, or in float16/bfloat16 where the CPU multiplies
// the dtype fast (common/half_gemm.h), go a layer at a time through linear's kernels instead (cpu/linear.cpp):
// each product is one oneDNN or BLAS GEMM, the bias and activation passes run over a layer's output, and every
// layer's output is rounded to the dtype, as in torch's unfused Sequential. The blocked loop's products are
// plain vectorized multiply-adds: at 4096x32->64->64->1 float32 its forward+backward took 1.5x the layer GEMMs'
// time (benchmarks/NOTES.md, "fused_mlp's layer GEMMs in float32"), and in half precision it computes at the
// float32 rate, 2-4x the time of the dtype's products ("bfloat16 matrix products"). Below kLayerGemmMinMacs the
// GEMMs' fixed cost (~10-25 us a call) loses instead. The GEMMs may split a product's sums by the thread count,
// so their results can differ in the last bit between thread counts, as torch's own do: with
// torch.use_deterministic_algorithms(True) the blocked loop runs at every size.
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "common/fused_mlp.h"
#include "common/half_gemm.h"
#include "cpu/allocator.h"
#include "cpu/fused_mlp_blocks.h"
#include "cpu/fused_mlp_step.h"
#include "ops.h"

namespace pyengine {
namespace {

using namespace fused_mlp_cpu;

// Forward of M rows: x (M, n_0) -> y (M, n_L), hidden[l] (M, n_{l+1}) = a_{l+1}.
template <typename scalar_t>
void forward(const Network<scalar_t>& net, const scalar_t* x, int64_t M, int64_t act, int64_t out_act,
             const std::vector<scalar_t*>& hidden, scalar_t* y) {
  using acc = acc_t<scalar_t>;
  const int64_t L = net.layers(), blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (kBlockRows * net.macs_per_row()));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc> in_buf(net.max_width() * kBlockRows), out_buf(in_buf.size());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlockRows, rows = std::min(kBlockRows, M - r0);
      load_block(x, net.in(0), r0, rows, in_buf.data());
      for (int64_t l = 0; l < L; ++l) {
        block_combine(net.weight(l), net.in(l), int64_t(1), net.bias(l), net.in(l), net.out(l), in_buf.data(),
                      out_buf.data());
        const bool last = l == L - 1;
        block_activate(out_buf.data(), net.out(l), last ? out_act : act);
        store_block(out_buf.data(), net.out(l), r0, rows, last ? y : hidden[l]);
        std::swap(in_buf, out_buf);
      }
    }
  });
}

// Backward of M rows. grads[l] (n_{l+1} * n_l + n_{l+1}, acc) receives dW_l then db_l when need_params.
template <typename scalar_t>
void backward(const Network<scalar_t>& net, const scalar_t* grad_y, const scalar_t* x,
              const std::vector<const scalar_t*>& hidden, const scalar_t* y, int64_t M, int64_t act, int64_t out_act,
              scalar_t* dx, bool need_params, std::vector<acc_t<scalar_t>>& grads) {
  using acc = acc_t<scalar_t>;
  const int64_t L = net.layers(), n_params = static_cast<int64_t>(net.params.size());
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t blocks_per_chunk = std::max<int64_t>(1, (blocks + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (2 * blocks_per_chunk * kBlockRows * net.macs_per_row()));
  std::vector<acc> partials(need_params ? chunks * n_params : 0, acc(0));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t buf_size = net.max_width() * kBlockRows;
    std::vector<acc> dz(buf_size), da(buf_size), a(buf_size), a_rows(buf_size), out(buf_size);
    for (int64_t c = c0; c < c1; ++c) {
      acc* part = need_params ? partials.data() + c * n_params : nullptr;
      for (int64_t b = c * blocks_per_chunk; b < std::min(blocks, (c + 1) * blocks_per_chunk); ++b) {
        const int64_t r0 = b * kBlockRows, rows = std::min(kBlockRows, M - r0);
        load_block(grad_y, net.out(L - 1), r0, rows, dz.data());
        if (out_act != kNone) {
          load_block(y, net.out(L - 1), r0, rows, out.data());
          block_activation_grad(dz.data(), out.data(), net.out(L - 1), out_act);
        }
        for (int64_t l = L - 1; l >= 0; --l) {
          const scalar_t* a_src = l == 0 ? x : hidden[l - 1];
          load_block(a_src, net.in(l), r0, rows, a.data());
          if (need_params) {
            acc* dW = part + net.offsets[l];
            acc* db = dW + net.out(l) * net.in(l);
            load_rows(a_src, net.in(l), r0, rows, a_rows.data());
            block_weight_grad(dz.data(), a_rows.data(), rows, net.in(l), net.out(l), dW);
            for (int64_t j = 0; j < net.out(l); ++j) db[j] += sum(dz.data() + j * kBlockRows, rows);
          }
          if (l == 0 && dx == nullptr) break;
          block_combine<acc>(net.weight(l), 1, net.in(l), nullptr, net.out(l), net.in(l), dz.data(), da.data());
          if (l == 0) {
            store_block(da.data(), net.in(0), r0, rows, dx);
          } else {
            block_activation_grad(da.data(), a.data(), net.in(l), act);
            std::swap(dz, da);
          }
        }
      }
    }
  });
  if (!need_params) return;
  grads.assign(n_params, acc(0));
  at::parallel_for(0, n_params, 4096, [&](int64_t p0, int64_t p1) {
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t p = p0; p < p1; ++p) grads[p] += partials[c * n_params + p];
    }
  });
}

// Multiply-adds per forward (M * sum of n_l n_{l+1}) from which the layer GEMMs win; see the top of the file.
constexpr int64_t kLayerGemmMinMacs = int64_t(1) << 22;

bool use_layer_gemms(const at::Tensor& x, const std::vector<int64_t>& widths) {
  int64_t macs = 0;
  for (size_t l = 0; l + 1 < widths.size(); ++l) macs += widths[l] * widths[l + 1];
  return (x.scalar_type() == at::kFloat || fast_half_gemm(x)) && x.size(0) * macs >= kLayerGemmMinMacs &&
         !at::globalContext().deterministicAlgorithms();
}

int64_t layer_activation(int64_t l, int64_t layers, int64_t act, int64_t out_act) {
  return l == layers - 1 ? out_act : act;
}

}  // namespace

std::vector<at::Tensor> fused_mlp_forward_cpu(const at::Tensor& x_in, const std::vector<at::Tensor>& weights,
                                              const std::vector<at::Tensor>& biases, int64_t activation,
                                              int64_t output_activation) {
  const char* op = "fused_mlp_forward_cpu";
  check(x_in, "x", op).cpu();
  const std::vector<int64_t> widths = check_network_call(x_in, weights, biases, activation, output_activation, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), L = static_cast<int64_t>(weights.size());
  if (use_layer_gemms(x, widths)) {  // outputs {y, a_1 .. a_{L-1}}
    std::vector<at::Tensor> outputs(L);
    at::Tensor a = x;
    for (int64_t l = 0; l < L; ++l) {
      a = linear_forward_cpu(a, weights[l], biases[l], layer_activation(l, L, activation, output_activation));
      outputs[l == L - 1 ? 0 : l + 1] = a;
    }
    return outputs;
  }
  std::vector<at::Tensor> outputs{cpu::empty_output({M, widths.back()}, x.options())};
  for (int64_t l = 0; l + 1 < L; ++l) outputs.push_back(cpu::empty_output({M, widths[l + 1]}, x.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_mlp_forward_cpu", [&] {
    const Network<scalar_t> net(widths, weights, biases);
    std::vector<scalar_t*> hidden;
    for (int64_t l = 1; l < L; ++l) hidden.push_back(outputs[l].data_ptr<scalar_t>());
    forward<scalar_t>(net, x.const_data_ptr<scalar_t>(), M, activation, output_activation, hidden,
                      outputs[0].data_ptr<scalar_t>());
  });
  return outputs;
}

std::vector<at::Tensor> fused_mlp_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                               const std::vector<at::Tensor>& weights,
                                               const std::vector<at::Tensor>& hidden_in, const at::Tensor& y_in,
                                               int64_t activation, int64_t output_activation, bool need_x,
                                               bool need_weights, bool need_biases) {
  const char* op = "fused_mlp_backward_cpu";
  check(x_in, "x", op).cpu();
  std::vector<int64_t> widths = check_network(x_in, weights, op);  // the biases are not read by the backward
  check_activation(activation, "activation", op);
  check_activation(output_activation, "output_activation", op);
  const int64_t M = x_in.size(0), L = static_cast<int64_t>(weights.size());
  check(grad_y_in, "grad_y", op).same_device(x_in).same_dtype(x_in).sizes({M, widths.back()});
  check(y_in, "y", op).same_device(x_in).same_dtype(x_in).sizes({M, widths.back()});
  TORCH_CHECK_VALUE(static_cast<int64_t>(hidden_in.size()) == L - 1, op, ": expected ", L - 1,
                    " saved hidden outputs, got ", hidden_in.size());
  std::vector<at::Tensor> hidden;
  for (int64_t l = 0; l + 1 < L; ++l) {
    check(hidden_in[l], "hidden", op).same_device(x_in).same_dtype(x_in).sizes({M, widths[l + 1]});
    hidden.push_back(hidden_in[l].contiguous());
  }
  const at::Tensor x = x_in.contiguous(), grad_y = grad_y_in.contiguous(), y = y_in.contiguous();
  const bool need_params = need_weights || need_biases;

  std::vector<at::Tensor> outputs(1 + 2 * L);
  if (use_layer_gemms(x, widths)) {  // from the top: da_{l+1} -> dz_l -> dW_l, db_l and da_l (the next one's dy)
    at::Tensor grad = grad_y;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t act = layer_activation(l, L, activation, output_activation);
      const at::Tensor& out = l == L - 1 ? y : hidden[l];
      std::vector<at::Tensor> d = linear_backward_cpu(grad, l == 0 ? x : hidden[l - 1], weights[l], l > 0 || need_x,
                                                      need_weights, need_biases, act, out);
      outputs[1 + l] = d[1];
      outputs[1 + L + l] = d[2];
      grad = d[0];
    }
    outputs[0] = grad;
    return outputs;
  }
  if (need_x) outputs[0] = cpu::empty_output({M, widths[0]}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_mlp_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const Network<scalar_t> net(widths, weights, {});
    std::vector<const scalar_t*> hidden_ptrs;
    for (const at::Tensor& h : hidden) hidden_ptrs.push_back(h.const_data_ptr<scalar_t>());
    std::vector<acc> grads;
    backward<scalar_t>(net, grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), hidden_ptrs,
                       y.const_data_ptr<scalar_t>(), M, activation, output_activation,
                       need_x ? outputs[0].data_ptr<scalar_t>() : nullptr, need_params, grads);
    for (int64_t l = 0; l < L && need_params; ++l) {  // separate tensors: an operator's outputs may not alias
      const acc* dW = grads.data() + net.offsets[l];
      const acc* db = dW + net.out(l) * net.in(l);
      if (need_weights) {
        outputs[1 + l] = at::empty({net.out(l), net.in(l)}, x.options());
        std::copy(dW, db, outputs[1 + l].data_ptr<scalar_t>());
      }
      if (need_biases) {
        outputs[1 + L + l] = at::empty({net.out(l)}, x.options());
        std::copy(db, db + net.out(l), outputs[1 + L + l].data_ptr<scalar_t>());
      }
    }
  });
  return outputs;
}

std::vector<at::Tensor> fused_mlp_training_step_cpu(const at::Tensor& x_in, const std::vector<at::Tensor>& weights,
                                                    const std::vector<at::Tensor>& biases, int64_t activation,
                                                    int64_t output_activation, const at::Tensor& target_in,
                                                    int64_t loss) {
  const char* op = "fused_mlp_training_step_cpu";
  check(x_in, "x", op).cpu();
  const std::vector<int64_t> widths = check_network_call(x_in, weights, biases, activation, output_activation, op);
  TORCH_CHECK_VALUE(loss >= 0 && loss <= 2, op, ": loss must be 0 (mse), 1 (bce with logits) or 2 (cross_entropy), ",
                    "got ", loss);
  const int64_t M = x_in.size(0), n_out = widths.back();
  const at::Tensor x = x_in.contiguous();
  at::Tensor target = target_in.contiguous();
  double count = static_cast<double>(M * n_out);
  if (loss == 2) {
    check(target, "target", op).same_device(x).sizes({M});
    TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class-index targets must be int64, got ",
                target.scalar_type());
    const int64_t* t = target.const_data_ptr<int64_t>();
    count = 0;
    for (int64_t r = 0; r < M; ++r) {  // before any work, as torch raises before it computes
      if (t[r] == kIgnoreIndex) continue;
      TORCH_CHECK_INDEX(t[r] >= 0 && t[r] < n_out, "Target ", t[r], " is out of bounds.");
      count += 1;
    }
  } else {
    check(target, "target", op).same_device(x).same_dtype(x).sizes({M, n_out});
  }
  at::Tensor value = at::empty({}, x.options()), grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_mlp_training_step_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const Network<scalar_t> net(widths, weights, biases);
    std::vector<acc> grads;
    double total = 0;
    // 1 / count: inf for an empty batch or every target ignored, where no row contributes and the loss is
    // 0 / 0 = NaN, as torch's mean of nothing
    training_step<scalar_t>(net, x.const_data_ptr<scalar_t>(), loss == 2 ? nullptr : target.const_data_ptr<scalar_t>(),
                            loss == 2 ? target.const_data_ptr<int64_t>() : nullptr, M, activation, output_activation,
                            loss, static_cast<acc>(1.0 / count), grads, total);
    value.data_ptr<scalar_t>()[0] = static_cast<scalar_t>(total / count);
    grad = at::empty({static_cast<int64_t>(grads.size())}, x.options());
    std::copy(grads.begin(), grads.end(), grad.data_ptr<scalar_t>());
  });
  return {value, grad};
}

}  // namespace pyengine

// FusedMLP's training step on the CPU in one pass over the rows (called by fused_mlp.cpp's
// fused_mlp_training_step_cpu): per block of 64 rows, the forward through every layer, the loss and its gradient,
// and the backward, with every activation kept in the block's feature-major buffers (cpu/fused_mlp_blocks.h).
// Nothing but x, the target and the parameters is read from memory and nothing but the parameter gradient is
// written: no hidden outputs saved, no output, no loss gradient tensor.
//
// loss (mean over the elements, or over the kept rows for cross_entropy), y = the network's output (M, n_L):
//   0 mse_loss:                        l = (y - t)^2,                          dl/dy = 2 (y - t)
//   1 binary_cross_entropy_with_logits l = (1 - t) y + softplus(-y),           dl/dy = sigmoid(y) - t
//   2 cross_entropy (t: class indices, -100 ignored)  l = lse(y) - y_t,       dl/dy_c = softmax(y)_c - [c == t]
// then dz = dl/dy / count * out_act'(y) and the backward of fused_mlp.cpp. Partial sums per chunk of rows
// (the split depends on M alone), added in chunk order: the same result with any number of threads.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/fused_mlp_blocks.h"
#include "cpu/softmax_rows.h"

namespace pyengine {
namespace fused_mlp_cpu {

constexpr int64_t kIgnoreIndex = -100;

// The loss of a block's rows and, in place of y's block, its gradient dl/dy times `scale` (1 / count); rows past
// `rows` get 0. y, t: feature-major (n, kBlockRows): t the target, or for cross_entropy a copy of the logits
// (y is overwritten by the softmax before the loss reads y_t); t_index: the block's class indices.
template <typename acc>
acc block_loss_and_grad(int64_t loss, acc* y, const acc* t, const int64_t* t_index, int64_t n, int64_t rows,
                        acc scale) {
  using Vec = at::vec::Vectorized<acc>;
  acc total = 0;
  if (loss == 2) {  // classes in the features, a row per lane: the lanes' softmax over the n classes
    for (int64_t r0 = 0; r0 < kBlockRows; r0 += Vec::size()) {
      const auto [shift, log_sum] =
          lanes_softmax<acc>(n, [&](int64_t c) { return Vec::loadu(y + c * kBlockRows + r0); });
      const Vec lse = shift + log_sum;
      acc lse_a[Vec::size()];
      lse.store(lse_a);
      for (int64_t c = 0; c < n; ++c) {
        acc* yc = y + c * kBlockRows + r0;
        pe_exp(Vec::loadu(yc) - lse).store(yc);  // the softmax p
      }
      for (int64_t i = 0; i < Vec::size(); ++i) {
        const int64_t r = r0 + i, tt = r < rows ? t_index[r] : kIgnoreIndex;
        // an ignored row's gradient is p * 0, NaN where p is (as torch's); kept rows (p - onehot) / count
        const acc row_scale = tt == kIgnoreIndex ? acc(0) : scale;
        for (int64_t c = 0; c < n; ++c) y[c * kBlockRows + r] *= row_scale;
        if (tt == kIgnoreIndex) continue;
        total += lse_a[i] - t[tt * kBlockRows + r];
        y[tt * kBlockRows + r] -= scale;
      }
    }
    return total;
  }
  const Vec one(acc(1)), g(scale);
  acc losses[kBlockRows];
  for (int64_t c = 0; c < n; ++c) {
    acc* yc = y + c * kBlockRows;
    for (int64_t r = 0; r < kBlockRows; r += Vec::size()) {
      const Vec yv = Vec::loadu(yc + r), tv = Vec::loadu(t + c * kBlockRows + r);
      if (loss == 0) {
        mse_loss_math(yv, tv).store(losses + r);
        mse_loss_grad_math(yv, tv, g).store(yc + r);
      } else {
        const auto loss_and_grad = bce_with_logits_loss_and_grad_math(yv, tv, one);
        loss_and_grad.loss.store(losses + r);
        (loss_and_grad.grad * g).store(yc + r);
      }
    }
    for (int64_t r = 0; r < rows; ++r) total += losses[r];
    std::fill(yc + rows, yc + kBlockRows, acc(0));
  }
  return total;
}

template <typename scalar_t>
void training_step(const Network<scalar_t>& net, const scalar_t* x, const scalar_t* target,
                   const int64_t* target_index, int64_t M, int64_t act, int64_t out_act, int64_t loss,
                   acc_t<scalar_t> scale, std::vector<acc_t<scalar_t>>& grads, double& total_loss) {
  using acc = acc_t<scalar_t>;
  const int64_t L = net.layers(), n_params = static_cast<int64_t>(net.params.size()), n_out = net.out(L - 1);
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t blocks_per_chunk = std::max<int64_t>(1, (blocks + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / (3 * blocks_per_chunk * kBlockRows * net.macs_per_row()));
  std::vector<acc> partials(chunks * n_params, acc(0)), chunk_loss(chunks, acc(0));
  int64_t offsets_total = 0;
  std::vector<int64_t> act_offset;  // a_l's block buffer within `acts`
  for (int64_t l = 0; l <= L; ++l) {
    act_offset.push_back(offsets_total);
    offsets_total += net.widths[l] * kBlockRows;
  }
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t width = net.max_width() * kBlockRows;
    std::vector<acc> acts(offsets_total), t(n_out * kBlockRows), dz(width), da(width), a_rows(width);
    for (int64_t c = c0; c < c1; ++c) {
      acc* part = partials.data() + c * n_params;
      for (int64_t b = c * blocks_per_chunk; b < std::min(blocks, (c + 1) * blocks_per_chunk); ++b) {
        const int64_t r0 = b * kBlockRows, rows = std::min(kBlockRows, M - r0);
        load_block(x, net.in(0), r0, rows, acts.data());
        for (int64_t l = 0; l < L; ++l) {
          acc* out = acts.data() + act_offset[l + 1];
          block_combine(net.weight(l), net.in(l), int64_t(1), net.bias(l), net.in(l), net.out(l),
                        acts.data() + act_offset[l], out);
          block_activate(out, net.out(l), l == L - 1 ? out_act : act);
        }
        acc* y = acts.data() + act_offset[L];
        std::copy(y, y + n_out * kBlockRows, dz.data());  // the output's gradient replaces a copy of it
        if (loss == 2) {
          std::copy(y, y + n_out * kBlockRows, t.data());  // the logits, for the loss's y_t
        } else {
          load_block(target, n_out, r0, rows, t.data());
        }
        chunk_loss[c] += block_loss_and_grad<acc>(loss, dz.data(), t.data(),
                                                  loss == 2 ? target_index + r0 : nullptr, n_out, rows, scale);
        block_activation_grad(dz.data(), y, n_out, out_act);
        for (int64_t l = L - 1; l >= 0; --l) {
          const acc* a = acts.data() + act_offset[l];
          acc* dW = part + net.offsets[l];
          acc* db = dW + net.out(l) * net.in(l);
          if (l == 0) {
            load_rows(x, net.in(0), r0, rows, a_rows.data());
          } else {
            for (int64_t r = 0; r < rows; ++r) {
              for (int64_t k = 0; k < net.in(l); ++k) a_rows[r * net.in(l) + k] = a[k * kBlockRows + r];
            }
          }
          block_weight_grad(dz.data(), a_rows.data(), rows, net.in(l), net.out(l), dW);
          for (int64_t j = 0; j < net.out(l); ++j) db[j] += sum(dz.data() + j * kBlockRows, rows);
          if (l == 0) break;
          block_combine<acc>(net.weight(l), 1, net.in(l), nullptr, net.out(l), net.in(l), dz.data(), da.data());
          block_activation_grad(da.data(), a, net.in(l), act);
          std::swap(dz, da);
        }
      }
    }
  });
  grads.assign(n_params, acc(0));
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t p = 0; p < n_params; ++p) grads[p] += partials[c * n_params + p];
    total_loss += chunk_loss[c];
  }
}

}  // namespace fused_mlp_cpu
}  // namespace pyengine

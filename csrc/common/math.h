// Per-element math shared by the CPU and CUDA kernels. Each formula lives here once; the CPU kernels also
// instantiate it with at::vec::Vectorized<float/double> (see cpu/vec_math.h for the vector overloads of
// pe_exp, pe_log, pe_max_nan, pe_zero_where_negative and pe_where_positive), so the CPU tests exercise the
// formulas the GPU runs.
#pragma once

#include <cmath>
#include <limits>

#include "common/activation.h"

#ifdef __CUDACC__
#define PE_HD __host__ __device__ __forceinline__
#else
#define PE_HD inline
#endif

namespace pyengine {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

PE_HD float pe_exp(float x) { return ::expf(x); }
PE_HD double pe_exp(double x) { return ::exp(x); }
PE_HD float pe_log(float x) { return ::logf(x); }
PE_HD double pe_log(double x) { return ::log(x); }
PE_HD float pe_log1p(float x) { return ::log1pf(x); }
PE_HD double pe_log1p(double x) { return ::log1p(x); }
// log1p(e) for e in [0, 1] (softplus's e^-|x|); NaN stays NaN. The CPU's float vectors have a faster one.
PE_HD float pe_log1p_unit(float e) { return ::log1pf(e); }
PE_HD double pe_log1p_unit(double e) { return ::log1p(e); }
PE_HD float pe_tanh(float x) { return ::tanhf(x); }
PE_HD double pe_tanh(double x) { return ::tanh(x); }
PE_HD float pe_abs(float x) { return ::fabsf(x); }
PE_HD double pe_abs(double x) { return ::fabs(x); }

// max(x, y) that returns NaN when x is NaN.
template <typename T> PE_HD T pe_max_nan(T x, T y) { return (x != x || x > y) ? x : y; }
// 0 where x < 0, else x itself: NaN and -0 stay as they are, as torch.relu keeps them.
template <typename T> PE_HD T pe_zero_where_negative(T x) { return x < T(0) ? T(0) : x; }
// 0 where y <= 0, else g: a NaN y passes g through, as torch's threshold_backward does.
template <typename T> PE_HD T pe_where_positive(T y, T g) { return y <= T(0) ? T(0) : g; }

// c > 0 ? a : b, lane by lane on vectors (NaN c picks b).
template <typename T> PE_HD T pe_select_positive(T c, T a, T b) { return c > T(0) ? a : b; }

// relu: y = max(x, 0) (NaN kept); dx = dy * (y > 0), from the output alone. -0 as torch gives it on each device:
// its CPU relu keeps -0 (x < 0 ? 0 : x); its CUDA relu is max(x, 0), where CUDA's max gives +0.
template <typename T> PE_HD T relu_forward_math(T x) {
#ifdef __CUDA_ARCH__
  return pe_max_nan(x, T(0));
#else
  return pe_zero_where_negative(x);
#endif
}
template <typename T> PE_HD T relu_backward_math(T dy, T y) { return pe_where_positive(y, dy); }

// sigmoid: y = 1 / (1 + e^-x); dx = dy * y * (1 - y), from the output alone. For x -> -inf e^-x
// overflows to inf and y -> 0 exactly; for x -> +inf y -> 1 and the gradient vanishes (saturation).
template <typename T> PE_HD T sigmoid_forward_math(T x) { return T(1) / (T(1) + pe_exp(T(0) - x)); }
template <typename T> PE_HD T sigmoid_backward_math(T dy, T y) { return dy * y * (T(1) - y); }

// tanh: dx = dy * (1 - y^2), from the output alone.
template <typename T> PE_HD T tanh_forward_math(T x) { return pe_tanh(x); }
template <typename T> PE_HD T tanh_backward_math(T dy, T y) { return dy * (T(1) - y * y); }

// linear's fused activation, by the code of its `activation` argument (pyengine/ops/linear.py ACTIVATIONS):
// y = act(z) after the product and bias, and dz = dy * act'(y) from the saved output alone.
template <Activation A, typename T> PE_HD T activation_forward_math(T z) {
  if constexpr (A == Activation::kRelu) return relu_forward_math(z);
  else if constexpr (A == Activation::kSigmoid) return sigmoid_forward_math(z);
  else return z;
}
template <Activation A, typename T> PE_HD T activation_backward_math(T dy, T y) {
  if constexpr (A == Activation::kRelu) return relu_backward_math(dy, y);
  else if constexpr (A == Activation::kSigmoid) return sigmoid_backward_math(dy, y);
  else return dy;
}

// leaky_relu: y = x > 0 ? x : slope * x; dx = dy * (x > 0 ? 1 : slope), from the input (slope may be <= 0).
template <typename T> PE_HD T leaky_relu_forward_math(T x, T slope) { return pe_select_positive(x, x, x * slope); }
template <typename T> PE_HD T leaky_relu_backward_math(T dy, T x, T slope) {
  return pe_select_positive(x, dy, dy * slope);
}

// mse_loss: l = (x - y)^2; dl/dx = 2 (x - y) * g, dl/dy = -dl/dx.
template <typename T> PE_HD T mse_loss_math(T x, T y) { return (x - y) * (x - y); }
template <typename T> PE_HD T mse_loss_grad_math(T x, T y, T g) { return T(2) * (x - y) * g; }

// Binary cross-entropy with logits, pw = pos_weight, lw = 1 + (pw - 1) y:
//   l = (1 - y) x + lw * softplus(-x),   dl/dx = lw * sigmoid(x) - pw * y,   dl/dy = (pw - 1) * softplus(-x) - x
// Both of x's functions come from one exponential e = e^-|x| in (0, 1], which never overflows:
//   softplus(-x) = log1p(e) + max(-x, 0)      sigmoid(x) = (x > 0 ? 1 : e) / (1 + e)
// so a forward that computes the loss and the gradient together (bce_with_logits_loss_and_grad_math) pays one.
template <typename T> PE_HD T bce_exp_neg_abs(T x) { return pe_exp(T(0) - pe_abs(x)); }
template <typename T> PE_HD T softplus_neg_from_exp(T x, T e) {
  return pe_log1p_unit(e) + pe_max_nan(T(0) - x, T(0));
}
template <typename T> PE_HD T sigmoid_from_exp(T x, T e) { return pe_select_positive(x, T(1), e) / (T(1) + e); }
template <typename T> PE_HD T softplus_neg_math(T x) { return softplus_neg_from_exp(x, bce_exp_neg_abs(x)); }
template <typename T> PE_HD T bce_with_logits_loss_from_exp(T x, T y, T pw, T e) {
  return (T(1) - y) * x + (T(1) + (pw - T(1)) * y) * softplus_neg_from_exp(x, e);
}
template <typename T> PE_HD T bce_with_logits_grad_input_from_exp(T x, T y, T pw, T e) {
  return (T(1) + (pw - T(1)) * y) * sigmoid_from_exp(x, e) - pw * y;
}
template <typename T> PE_HD T bce_with_logits_loss_math(T x, T y, T pw) {
  return bce_with_logits_loss_from_exp(x, y, pw, bce_exp_neg_abs(x));
}
template <typename T> PE_HD T bce_with_logits_grad_input_math(T x, T y, T pw) {
  return bce_with_logits_grad_input_from_exp(x, y, pw, bce_exp_neg_abs(x));
}
// The loss and the input gradient together (the training forward of a reduced loss): the two above, from one exp.
template <typename T> struct LossAndGrad {
  T loss;
  T grad;
};
// mse_loss's loss and dl/dx for an incoming g, from one read of x and y (the forward_with_grad kernels).
template <typename T> PE_HD LossAndGrad<T> mse_loss_and_grad_math(T x, T y, T g) {
  return {mse_loss_math(x, y), mse_loss_grad_math(x, y, g)};
}
template <typename T> PE_HD LossAndGrad<T> bce_with_logits_loss_and_grad_math(T x, T y, T pw) {
  const T e = bce_exp_neg_abs(x);
  return {bce_with_logits_loss_from_exp(x, y, pw, e), bce_with_logits_grad_input_from_exp(x, y, pw, e)};
}
template <typename T> PE_HD T bce_with_logits_grad_target_math(T x, T pw) {
  return (pw - T(1)) * softplus_neg_math(x) - x;
}

// Online softmax (Milakov & Gimelshein): one pass keeps the running max m and s = sum(exp(x - m)),
// rescaling s whenever the max grows. -inf logits contribute nothing; NaN propagates into s.
template <typename T> struct SoftmaxState {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);
};

template <typename T> PE_HD void online_softmax_add(SoftmaxState<T>& st, T x) {
  if (x > st.max) {
    st.sum = st.sum * pe_exp(st.max - x) + T(1);
    st.max = x;
  } else if (x != -std::numeric_limits<T>::infinity()) {
    st.sum += pe_exp(x - st.max);
  }
}

// Merges two partial states (warp shuffles, per-thread partials).
template <typename T> PE_HD SoftmaxState<T> online_softmax_merge(SoftmaxState<T> a, SoftmaxState<T> b) {
  if (b.max > a.max) {
    SoftmaxState<T> t = a;
    a = b;
    b = t;
  }
  // An all -inf part has sum 0 (or NaN if it saw a NaN): add it unscaled so NaN still propagates.
  a.sum += b.max == -std::numeric_limits<T>::infinity() ? b.sum : b.sum * pe_exp(b.max - a.max);
  return a;
}

// logsumexp of the row: m + log(s); -inf for an all -inf row. A +inf logit gives NaN, as in torch's
// log_softmax (its x - max is inf - inf), so such a row's loss and gradient are NaN like torch's.
template <typename T> PE_HD T online_softmax_lse(SoftmaxState<T> st) {
  return st.max == std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::quiet_NaN()
                                                      : st.max + pe_log(st.sum);
}

// Cross-entropy with class-index target t, class weights w (all 1 without weight), smoothing eps, C classes:
//   loss = (1 - eps) * w_t * (lse - x_t) + eps / C * sum_c w_c * (lse - x_c)
//   dloss/dx_j = p_j * ((1 - eps) * w_t + eps / C * sum_c w_c) - [j == t] * (1 - eps) * w_t - eps / C * w_j
// With eps = 0 and no weight this is the familiar p - onehot(t). The caller multiplies by the incoming
// gradient and 1/denominator for reduction='mean'.
template <typename T> struct CrossEntropyIndexCoefs {
  T target;  // (1 - eps) * w_t
  T row;     // (1 - eps) * w_t + eps / C * sum_c w_c
  T smooth;  // eps / C
};

template <typename T> PE_HD CrossEntropyIndexCoefs<T> cross_entropy_index_coefs(T w_t, T w_sum, T eps, T num_classes) {
  T smooth = eps / num_classes;
  return {(T(1) - eps) * w_t, (T(1) - eps) * w_t + smooth * w_sum, smooth};
}

template <typename T>
PE_HD T cross_entropy_index_loss(CrossEntropyIndexCoefs<T> k, T lse, T x_t, T w_sum, T wx_sum) {
  // wx_sum = sum_c w_c * x_c; eps / C * sum_c w_c (lse - x_c) = smooth * (w_sum * lse - wx_sum)
  T loss = k.target * (lse - x_t);
  if (k.smooth != T(0)) loss += k.smooth * (w_sum * lse - wx_sum);
  return loss;
}

template <typename T> PE_HD T cross_entropy_index_grad(CrossEntropyIndexCoefs<T> k, T p, bool is_target, T w_j) {
  return p * k.row - (is_target ? k.target : T(0)) - k.smooth * w_j;
}

// Cross-entropy with class-probability targets y (smoothed: y' = (1 - eps) * y + eps / C):
//   loss = sum_c w_c * y'_c * (lse - x_c)
//   dloss/dx_j = p_j * sum_c w_c * y'_c - w_j * y'_j
template <typename T> PE_HD T smoothed_probability(T y, T eps, T num_classes) {
  return (T(1) - eps) * y + eps / num_classes;
}
// loss = lse * sum_c w_c y'_c - sum_c w_c y'_c x_c (lse and x may both be taken relative to the row max).
template <typename T> PE_HD T cross_entropy_prob_loss(T wy_sum, T lse, T wyx_sum) { return wy_sum * lse - wyx_sum; }
template <typename T> PE_HD T cross_entropy_prob_grad(T p, T wy_sum, T w_j, T y_j) { return p * wy_sum - w_j * y_j; }

}  // namespace pyengine

// Vector overloads of the primitives that common/math.h builds its formulas from, so those same formulas
// run on at::vec::Vectorized<float/double> in the CPU kernels. Include this instead of common/math.h in
// CPU code: the overloads must be declared before the templates in math.h that call them.
#pragma once

// gcc before 12.3 warns "'__Y' may be used uninitialized" (-Wmaybe-uninitialized, sometimes -Wuninitialized)
// wherever an AVX-512 intrinsic built on _mm512_undefined_ps() and kin is inlined: their deliberate
// self-initialization, GCC bug 105593. It is a false positive inside the compiler's own header that our code
// reaches only through torch's (at::vec, and c10::Half's scalar conversions under CPU_CAPABILITY_AVX512), so it
// cannot be fixed at the source. gcc honours a diagnostic pragma at any location of the inlining chain, so it is
// silenced over those torch headers alone and stays on for our code. A pragma covers a header only where it is
// first included, so both builds force-include this header ahead of every C++ source (-include cpu/vec_math.h
// in setup.py and CMakeLists.txt).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <limits>

namespace pyengine {

template <typename T> at::vec::Vectorized<T> pe_exp(const at::vec::Vectorized<T>& x) { return x.exp(); }
// exp for the loops it bounds (softmax's rows, tanh), where the caller can afford exp_u20's ~20 ulp and its flush of
// results below 2^-126 to 0 outside AVX-512; NaN passes through (exp_u20 alone clamps it to a finite value).
template <typename T> at::vec::Vectorized<T> pe_exp_fast(const at::vec::Vectorized<T>& x) {
  return at::vec::Vectorized<T>::blendv(x.exp_u20(), x, x.isnan());
}
#ifdef CPU_CAPABILITY_AVX512
// x = n ln2 + r (float, AVX-512; pe_exp and tanh's expm1): n = round(x log2 e) and r in [-ln2/2, ln2/2], ln2 split
// in two (Cody and Waite) so n ln2 is exact to float's precision. x must be finite.
struct ExpReduced {
  __m512 n, r;
};
inline ExpReduced exp_reduce(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f), ln2_lo = _mm512_set1_ps(1.42860682e-6f);
  return {n, _mm512_fnmadd_ps(n, ln2_lo, _mm512_fnmadd_ps(n, ln2_hi, x))};
}
// (e^r - 1) / r = 1 + r/2 + ... + r^6/7! for r from exp_reduce: e^r - 1 is this times r, e^r that plus 1.
inline __m512 expm1_over_r(__m512 r) {
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return p;
}
// float exp on AVX-512 (sigmoid, binary_cross_entropy_with_logits, softmax's rows): e^x = 2^n e^r (exp_reduce), e^r
// its Taylor series through r^7 / 7!: the first term left out, r^8 / 8!, is below 5.2e-9 of the result. vscalefps
// multiplies by 2^n with one rounding and IEEE's rules, so overflow gives inf, results below 2^-126 are gradual
// (denormal) and NaN stays NaN; clamping x to [-104, 89] first (max/min return their second operand, x, when it is
// NaN) keeps r finite at +-inf, and still overflows or underflows every x beyond. Measured against double over
// [-110, 90] at 200k points: within 0.93 ulp, every denormal, inf and 0 as the rounded exp.
// 1M floats on one Zen 4 core: 274 us, against 331 us for Sleef's 1-ulp exp and 304 us for exp_u20 (20 ulp).
inline at::vec::Vectorized<float> pe_exp(const at::vec::Vectorized<float>& x) {
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const ExpReduced e = exp_reduce(xc);
  return _mm512_scalef_ps(_mm512_fmadd_ps(expm1_over_r(e.r), e.r, _mm512_set1_ps(1.0f)), e.n);
}
inline at::vec::Vectorized<float> pe_exp_fast(const at::vec::Vectorized<float>& x) { return pe_exp(x); }
#endif
template <typename T> at::vec::Vectorized<T> pe_log(const at::vec::Vectorized<T>& x) { return x.log(); }
// log1p through log: log1p(x) = log(u) * x / (u - 1) with u = fl(1 + x) (Goldberg's trick, Higham, "Accuracy and
// Stability of Numerical Algorithms", 2nd ed., 1.14.1): u's rounding error cancels out of the ratio, leaving a few
// ulps. Sleef's log1p ran ~8x slower than its log here (1M floats, 2 cores: 8.9 ms against 1.1 ms), and it was
// most of binary_cross_entropy_with_logits' forward. x where u rounds to 1 (a tiny or signed-zero x); log(u) where
// u is inf (x / (u - 1) would be inf / inf); -1 gives log(0) = -inf, below it NaN, and NaN stays NaN.
template <typename T> at::vec::Vectorized<T> pe_log1p(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one(T(1)), u = x + one, d = u - one, log_u = u.log();
  const Vec ratio = log_u * (x / d);
  return Vec::blendv(Vec::blendv(ratio, log_u, u == Vec(std::numeric_limits<T>::infinity())), x, d == Vec(T(0)));
}
template <typename T> at::vec::Vectorized<T> pe_log1p_unit(const at::vec::Vectorized<T>& e) { return pe_log1p(e); }
// float log1p(e) for e in [0, 1], binary_cross_entropy_with_logits' softplus(-x) = log1p(e^-|x|) + max(-x, 0): with
// s = e / (2 + e) in [0, 1/3], log1p(e) = log((1 + s) / (1 - s)) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...).
// Through s^14 / 15 the first term left out is below (1/9)^8 / 17 = 1.4e-9 of the result; s itself is one division
// (~1 rounding), so ~2 roundings in all (torch's log1pf: 1), with one division and 7 multiply-adds where the log
// form above takes a log and two divisions. NaN e gives NaN.
inline at::vec::Vectorized<float> pe_log1p_unit(const at::vec::Vectorized<float>& e) {
  using Vec = at::vec::Vectorized<float>;
  const Vec s = e / (Vec(2.0f) + e), s2 = s * s;
  Vec p(1.0f / 15.0f);
  for (const float c : {1.0f / 13.0f, 1.0f / 11.0f, 1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f}) {
    p = at::vec::fmadd(p, s2, Vec(c));
  }
  const Vec two_s = s + s;
  return at::vec::fmadd(two_s * s2, p, two_s);
}
template <typename T> at::vec::Vectorized<T> pe_tanh(const at::vec::Vectorized<T>& x) { return x.tanh(); }
#ifdef CPU_CAPABILITY_AVX512
// float tanh on AVX-512 from one expm1, with no branch and no division: with m = expm1(-2|x|) in [-1, 0],
//   tanh(|x|) = (1 - e^(-2|x|)) / (1 + e^(-2|x|)) = -m / (2 + m),
// a quotient with no cancellation (2 + m is in [1, 2]), given x's sign. expm1(y) = 2^n (e^r - 1) + (2^n - 1) with
// y = n ln2 + r (exp_reduce), and e^r - 1 = r expm1_over_r(r) evaluated without its leading 1, so a small x keeps
// every digit (n = 0: m is that series; the first term left out is below 1.5e-8 of it). 2^n - 1 is exact down to
// n = -24, below it off by less than half an ulp of m ~ -1. y is held at -40 and above (tanh is 1 in float long
// before), which keeps n finite; a NaN x stays NaN.
// Why not the two-branch form below: Intel's cores issue 512-bit operations on two ports, and its ~40 vector
// operations a vector (both branches, three blends and a division) made tanh compute bound there: 1M floats on two
// Xeon cores took 336 us against torch's 182 us. This one takes 23.
inline at::vec::Vectorized<float> pe_tanh(const at::vec::Vectorized<float>& xv) {
  const __m512 x = xv, sign = _mm512_set1_ps(-0.0f);
  const __m512 minus_2ax = _mm512_mul_ps(_mm512_andnot_ps(sign, x), _mm512_set1_ps(-2.0f));
  const __m512 y = _mm512_max_ps(_mm512_set1_ps(-40.0f), minus_2ax);  // NaN is max's second operand: kept
  const ExpReduced e = exp_reduce(y);
  const __m512 two_n = _mm512_scalef_ps(_mm512_set1_ps(1.0f), e.n);
  const __m512 expm1_r = _mm512_mul_ps(expm1_over_r(e.r), e.r);
  const __m512 m = _mm512_fmadd_ps(two_n, expm1_r, _mm512_sub_ps(two_n, _mm512_set1_ps(1.0f)));
  // t = m / d = -tanh(|x|), d = 2 + m, with no division: r0 = vrcp14ps(d) (relative error below 2^-14), u = m r0,
  // and one Newton step t = u + u (1 - d r0), which squares r0's error to below 2^-28, under its own roundings.
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(2.0f), m), r0 = _mm512_rcp14_ps(d), u = _mm512_mul_ps(m, r0);
  const __m512 t = _mm512_fmadd_ps(u, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(1.0f)), u);
  // x's sign bit on t's magnitude bits
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(sign), _mm512_castps_si512(x),
                                                       _mm512_castps_si512(t), 0xCA));
}
#else
// float tanh without Sleef's tanh, which ran 4-5x slower than torch's (MKL's) here (1M floats, 2 cores: 1.27-1.64
// ms against 0.26-0.38 ms; now ~1.5x torch's time). |x| < 0.55: the odd Taylor series x - x^3/3 + 2x^5/15 - ...
// through x^17 (the first term left out is below 6e-9 of the result); above: 1 - 2 / (exp(2|x|) + 1) with x's
// sign, where the fraction is below 0.5, so the subtraction loses no digits; exp overflowing to inf gives 1.
// exp is pe_exp_fast. Against float64 over [-12, 12]: at most 2.4e-7 relative error with exp_u20; torch's float32
// tanh: 6e-8.
inline at::vec::Vectorized<float> pe_tanh(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec ax = x.abs(), x2 = x * x;
  Vec p(6404582.0f / 10854718875.0f);
  for (const float c : {-929569.0f / 638512875.0f, 21844.0f / 6081075.0f, -1382.0f / 155925.0f, 62.0f / 2835.0f,
                        -17.0f / 315.0f, 2.0f / 15.0f, -1.0f / 3.0f}) {
    p = at::vec::fmadd(p, x2, Vec(c));
  }
  const Vec series = at::vec::fmadd(x * x2, p, x);
  const Vec one(1.0f), two(2.0f);
  const Vec large = one - two / (pe_exp_fast(ax * two) + one);
  const Vec signed_large = Vec::blendv(large, Vec(0.0f) - large, x < Vec(0.0f));
  const Vec result = Vec::blendv(signed_large, series, ax < Vec(0.55f));
  return Vec::blendv(result, x, x.isnan());  // a NaN x took the exp branch; keep it NaN whatever that gave
}
#endif
template <typename T> at::vec::Vectorized<T> pe_abs(const at::vec::Vectorized<T>& x) { return x.abs(); }
template <typename T>
at::vec::Vectorized<T> pe_select_positive(const at::vec::Vectorized<T>& c, const at::vec::Vectorized<T>& a,
                                          const at::vec::Vectorized<T>& b) {
  return at::vec::Vectorized<T>::blendv(b, a, c > at::vec::Vectorized<T>(T(0)));
}
// NaN compares false: a NaN x is kept, as is -0.
template <typename T> at::vec::Vectorized<T> pe_zero_where_negative(const at::vec::Vectorized<T>& x) {
  const at::vec::Vectorized<T> zero(T(0));
  return at::vec::Vectorized<T>::blendv(x, zero, x < zero);
}
// at::vec::maximum propagates NaN.
template <typename T>
at::vec::Vectorized<T> pe_max_nan(const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& y) {
  return at::vec::maximum(x, y);
}
// Comparison gives an all-ones/all-zeros lane mask; NaN compares false, so a NaN y keeps g.
template <typename T>
at::vec::Vectorized<T> pe_where_positive(const at::vec::Vectorized<T>& y, const at::vec::Vectorized<T>& g) {
  const at::vec::Vectorized<T> zero(T(0));
  return at::vec::Vectorized<T>::blendv(g, zero, y <= zero);
}

}  // namespace pyengine

#include "common/math.h"

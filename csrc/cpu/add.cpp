// Broadcast add on the CPU.
//   forward:  out = input + alpha * other, shapes broadcast as in PyTorch (aligned from the right, a missing or
//             size-1 dim repeats), out of the broadcast shape laid out as torch.add lays it out (common/layout.h:
//             channels_last + channels_last or + a (C, 1, 1) bias stays channels_last; where the operands'
//             layouts disagree input's wins). Floating types compute fma(other, alpha, input) in acc_t and round
//             once; integers wrap; bool is input || (other && alpha).
//   backward: d operand = scale * (grad summed over the dims broadcasting added or stretched), of the operand's
//             shape (scale is 1 for input, alpha for other): contiguous when it sums (torch's sum_to), laid out
//             as grad when it does not (torch's grad * alpha).
// Both first collapse the dims, taken in the output's memory order: size-1 dims dropped, neighbours that
// broadcast the same way merged. Same shape and layout, row bias (a channels_last tensor's channel bias too) and
// scalar operands then all become one vectorized loop over the last dim.
#include "cpu/elementwise.h"  // first: see cpu/vec_math.h

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "common/layout.h"
#include "cpu/reduce.h"
#include "ops.h"

namespace pyengine {
namespace {

template <int K> using Kind = std::integral_constant<int, K>;  // an inner stride: 1 unit, 0 repeated, -1 any

template <typename scalar_t>
constexpr bool is_float_v = std::is_floating_point_v<scalar_t> || cpu::is_reduced_float<scalar_t>();

std::vector<int64_t> broadcast_shape(at::IntArrayRef a, at::IntArrayRef b, const char* op) {
  const int64_t n = std::max(a.size(), b.size()), pa = n - a.size(), pb = n - b.size();
  std::vector<int64_t> out(n);
  for (int64_t d = 0; d < n; ++d) {
    const int64_t sa = d < pa ? 1 : a[d - pa], sb = d < pb ? 1 : b[d - pb];
    TORCH_CHECK(sa == sb || sa == 1 || sb == 1, op, ": the shapes ", a, " and ", b,
                " do not broadcast (size ", sa, " vs ", sb, " at dim ", d, " of the broadcast shape)");
    out[d] = sa == 1 ? sb : sa;
  }
  return out;
}

// t's strides over the dims of `shape` it broadcasts to: 0 where t lacks the dim or stretches a size-1 one.
at::DimVector broadcast_strides(const at::Tensor& t, at::IntArrayRef shape) {
  const int64_t lead = shape.size() - t.dim();
  at::DimVector s(shape.size(), 0);
  for (int64_t d = lead; d < static_cast<int64_t>(shape.size()); ++d)
    if (t.size(d - lead) != 1) s[d] = t.stride(d - lead);
  return s;
}

// Drops size-1 dims and merges each dim into the next one when every operand steps through both as through
// one dim (stride[d] == stride[d+1] * size[d+1]). An empty result means a single element.
template <int N>
cpu::StridedDims<N> collapse(at::IntArrayRef sizes, const std::array<at::IntArrayRef, N>& strides) {
  cpu::StridedDims<N> dims;
  for (int64_t d = 0; d < static_cast<int64_t>(sizes.size()); ++d) {
    if (sizes[d] == 1) continue;
    std::array<int64_t, N> s;
    for (int k = 0; k < N; ++k) s[k] = strides[k][d];
    dims.push_back(sizes[d], s);
  }
  cpu::StridedDims<N> out;
  for (int64_t d = dims.ndim() - 1; d >= 0; --d) {
    bool merge = out.ndim() > 0;
    for (int k = 0; k < N && merge; ++k)
      merge = dims.strides[k][d] == out.strides[k].front() * out.sizes.front();
    if (merge) {
      out.sizes.front() *= dims.sizes[d];
      continue;
    }
    out.sizes.insert(out.sizes.begin(), dims.sizes[d]);
    for (int k = 0; k < N; ++k) out.strides[k].insert(out.strides[k].begin(), dims.strides[k][d]);
  }
  return out;
}

// One element: fma in acc_t for floating types, wrapping arithmetic for integers, logical or for bool.
template <typename scalar_t, typename alpha_t> scalar_t add_one(scalar_t a, scalar_t b, alpha_t alpha) {
  if constexpr (std::is_same_v<scalar_t, bool>) {
    return a || (b && alpha);
  } else if constexpr (std::is_integral_v<scalar_t>) {
    using U = std::conditional_t<sizeof(scalar_t) <= 4, uint32_t, uint64_t>;  // unsigned: overflow wraps
    return static_cast<scalar_t>(static_cast<U>(a) + static_cast<U>(alpha) * static_cast<U>(b));
  } else {
    using acc = acc_t<scalar_t>;
    return static_cast<scalar_t>(std::fma(static_cast<acc>(b), alpha, static_cast<acc>(a)));
  }
}

// out[i] = a[i * sa] + alpha * b[i * sb] for i < n. KA/KB pick the loads at compile time: a unit stride loads
// vectors, a zero stride repeats one value; floating types are vectorized when neither stride is arbitrary.
template <typename scalar_t, int KA, int KB, typename alpha_t>
void add_row(scalar_t* out, const scalar_t* a, int64_t sa, const scalar_t* b, int64_t sb, int64_t n, alpha_t alpha) {
  if constexpr (KA == 1) sa = 1;
  if constexpr (KA == 0) sa = 0;
  if constexpr (KB == 1) sb = 1;
  if constexpr (KB == 0) sb = 0;
  int64_t i = 0;
  if constexpr (is_float_v<scalar_t> && KA >= 0 && KB >= 0) {
    using acc = acc_t<scalar_t>;
    using AccVec = cpu::Vectorized<acc>;
    using Vec = cpu::Vectorized<scalar_t>;
    const AccVec va0(static_cast<acc>(a[0])), vb0(static_cast<acc>(b[0])), valpha(alpha);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      if constexpr (cpu::is_reduced_float<scalar_t>()) {
        AccVec alo = va0, ahi = va0, blo = vb0, bhi = vb0;
        if constexpr (KA == 1) std::tie(alo, ahi) = at::vec::convert_to_float<scalar_t>(Vec::loadu(a + i));
        if constexpr (KB == 1) std::tie(blo, bhi) = at::vec::convert_to_float<scalar_t>(Vec::loadu(b + i));
        at::vec::convert_from_float<scalar_t>(at::vec::fmadd(blo, valpha, alo), at::vec::fmadd(bhi, valpha, ahi))
            .store(out + i);
      } else {
        const Vec x = KA == 1 ? Vec::loadu(a + i) : va0, y = KB == 1 ? Vec::loadu(b + i) : vb0;
        at::vec::fmadd(y, valpha, x).store(out + i);
      }
    }
  }
  for (; i < n; ++i) out[i] = add_one<scalar_t>(a[i * sa], b[i * sb], alpha);
}

// out (contiguous, dims' numel elements) = a + alpha * b over the collapsed dims; parallel over flat ranges
// of out, each walked row by row along the last dim.
template <typename scalar_t, typename alpha_t>
void add_strided(scalar_t* out, const scalar_t* a, const scalar_t* b, cpu::StridedDims<2> dims, alpha_t alpha) {
  if (dims.ndim() == 0) dims.push_back(1, {0, 0});
  const int64_t n = dims.sizes.back(), sa = dims.strides[0].back(), sb = dims.strides[1].back();
  dims.sizes.pop_back();
  dims.strides[0].pop_back();
  dims.strides[1].pop_back();
  auto run = [&](auto ka, auto kb) {
    at::parallel_for(0, dims.numel() * n, cpu::kElementwiseGrain, [&](int64_t begin, int64_t end) {
      cpu::DimCounter<2> row(dims, begin / n);
      for (int64_t pos = begin, j = begin % n; pos < end; j = 0, row.next()) {
        const int64_t len = std::min(n - j, end - pos);
        add_row<scalar_t, decltype(ka)::value, decltype(kb)::value>(
            out + pos, a + row.offset[0] + j * sa, sa, b + row.offset[1] + j * sb, sb, len, alpha);
        pos += len;
      }
    });
  };
  const bool unit_or_zero = (sa == 0 || sa == 1) && (sb == 0 || sb == 1);
  if (!unit_or_zero) return run(Kind<-1>{}, Kind<-1>{});
  if (sa == 1 && sb == 1) return run(Kind<1>{}, Kind<1>{});
  if (sa == 1) return run(Kind<1>{}, Kind<0>{});
  if (sb == 1) return run(Kind<0>{}, Kind<1>{});
  run(Kind<0>{}, Kind<0>{});
}

// A short last dim with one operand repeating a single row, as a bias added to a narrow matrix ((759, 6) + (6)):
// rows of n < one vector leave add_row's vector loop idle and pay the row walk per n elements. When the other
// operand is contiguous over both dims, k rows at a time are one row of k * n elements against the repeated row
// tiled k times (in a stack buffer), the same sums in the same order; the rows past a multiple of k go the usual
// way. Returns false when the shape is not of that kind.
template <typename scalar_t, typename alpha_t>
bool add_repeated_row(scalar_t* out, const scalar_t* a, const scalar_t* b, const cpu::StridedDims<2>& dims,
                      alpha_t alpha) {
  constexpr int64_t kTile = 256, kMaxRow = 32;
  if (dims.ndim() != 2 || dims.sizes[1] > kMaxRow) return false;
  const int64_t rows = dims.sizes[0], n = dims.sizes[1], k = kTile / n;
  const auto matrix = [&](int op) { return dims.strides[op][0] == n && dims.strides[op][1] == 1; };
  const auto repeated = [&](int op) { return dims.strides[op][0] == 0 && dims.strides[op][1] == 1; };
  const bool row_is_b = matrix(0) && repeated(1), row_is_a = repeated(0) && matrix(1);
  if (!(row_is_a || row_is_b) || rows < 2 * k) return false;
  scalar_t tile[kTile];
  const scalar_t* row = row_is_b ? b : a;
  for (int64_t r = 0; r < k; ++r) std::copy(row, row + n, tile + r * n);
  const int64_t whole = rows / k * k;
  cpu::StridedDims<2> tiled;
  tiled.push_back(whole / k, {row_is_a ? 0 : k * n, row_is_b ? 0 : k * n});
  tiled.push_back(k * n, {1, 1});
  add_strided(out, row_is_a ? tile : a, row_is_b ? tile : b, tiled, alpha);
  if (whole == rows) return true;
  cpu::StridedDims<2> rest = dims;
  rest.sizes[0] = rows - whole;
  add_strided(out + whole * n, row_is_a ? a : a + whole * n, row_is_b ? b : b + whole * n, rest, alpha);
  return true;
}

}  // namespace

at::Tensor add_forward_cpu(const at::Tensor& input, const at::Tensor& other, const at::Scalar& alpha) {
  check(input, "input", "add_forward_cpu").cpu();
  check(other, "other", "add_forward_cpu").same_device(input).same_dtype(input);
  const auto dtype = input.scalar_type();
  TORCH_CHECK(!alpha.isBoolean() || dtype == at::kBool, "add_forward_cpu: Boolean alpha only supported for ",
              "Boolean results.");
  TORCH_CHECK(at::isFloatingType(dtype) || alpha.isIntegral(true), "add_forward_cpu: for integral input tensors, ",
              "argument alpha must not be a floating point number.");
  const std::vector<int64_t> shape = broadcast_shape(input.sizes(), other.sizes(), "add_forward_cpu");
  const at::DimVector out_strides = elementwise_output_strides(shape, {input, other});
  at::Tensor out = cpu::empty_output(shape, out_strides, input.options());
  if (out.numel() == 0) return out;
  // The dims outermost first in out's memory: out is contiguous over them in that order, as add_strided writes it.
  const at::DimVector order = dims_outermost_first(out_strides);
  const auto dims = collapse<2>(permuted(shape, order), {permuted(broadcast_strides(input, shape), order),
                                                         permuted(broadcast_strides(other, shape), order)});
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, dtype, "add_forward_cpu", [&] {
    using alpha_t = std::conditional_t<is_float_v<scalar_t>, acc_t<scalar_t>, scalar_t>;
    // bool: any nonzero alpha keeps other, as bool(alpha) in the python reference
    const alpha_t a = std::is_same_v<scalar_t, bool> ? alpha_t(alpha.isBoolean() ? alpha.toBool() : alpha.toLong() != 0)
                                                     : alpha.to<alpha_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t *x = input.const_data_ptr<scalar_t>(), *y = other.const_data_ptr<scalar_t>();
    if (!add_repeated_row(o, x, y, dims, a)) add_strided(o, x, y, dims, a);
  });
  return out;
}

at::Tensor add_backward_cpu(const at::Tensor& grad, at::IntArrayRef shape, const at::Scalar& scale) {
  check(grad, "grad", "add_backward_cpu").cpu().floating();
  const int64_t n = grad.dim(), lead = n - static_cast<int64_t>(shape.size());
  TORCH_CHECK(lead >= 0, "add_backward_cpu: shape ", shape, " has more dims than grad ", grad.sizes());
  // The result's strides over grad's dims, 0 on the summed ones: collapse then merges only dims of one kind.
  std::vector<int64_t> out_strides(n, 0);
  int64_t next = 1;
  for (int64_t d = n - 1; d >= lead; --d) {
    TORCH_CHECK(shape[d - lead] == grad.size(d) || shape[d - lead] == 1, "add_backward_cpu: grad ", grad.sizes(),
                " does not broadcast from shape ", shape);
    if (shape[d - lead] == grad.size(d)) {
      out_strides[d] = next;
      next *= grad.size(d);
    }
  }
  auto dims = collapse<2>(grad.sizes(), {grad.strides(), out_strides});
  bool any_summed = false;
  for (int64_t st : dims.strides[1]) any_summed |= st == 0;

  // torch's gradient is grad * scale when the shapes match, laid out by the general rule of common/layout.h (the
  // scalar is an operand of another shape): a dense grad's own layout; with dims to sum, sum_to's contiguous sum.
  const bool same_shape = grad.sizes() == shape;
  at::Tensor out = same_shape ? cpu::empty_output(shape, strides_in_operand_order(shape, {grad}), grad.options())
                              : cpu::empty_output(shape, grad.options());
  if (out.numel() == 0) return out;
  // out seen with grad's dims: itself, or contiguous when only dims of one element differ
  const bool grad_in_order = !any_summed && (same_shape ? same_layout(grad, out.strides()) : grad.is_contiguous());
  if (!any_summed && !grad_in_order) {  // a copy (strided: torch's copy kernel), scaled in place below
    out.view(grad.sizes()).copy_(grad);
    if (scale.equal(1)) return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "add_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc s = scale.to<acc>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    if (!any_summed) {  // grad times scale: a copy, never grad itself, which the caller may still hold
      const scalar_t* src = grad_in_order ? grad.const_data_ptr<scalar_t>() : dst;
      cpu::map_acc(dst, out.numel(), [s](auto v) { return v * s; }, src);
      return;
    }
    cpu::StridedDims<1> kept, summed;
    for (int64_t d = 0; d + 1 < dims.ndim(); ++d)
      (dims.strides[1][d] == 0 ? summed : kept).push_back(dims.sizes[d], {dims.strides[0][d]});
    const int64_t inner = dims.sizes.back(), inner_stride = dims.strides[0].back();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    if (dims.strides[1].back() != 0) {  // the last dim is kept: column sums over rows
      cpu::sum_columns(dst, g, kept, summed, inner, inner_stride, s);
    } else {  // the last dim is summed too: row sums
      cpu::sum_inner(dst, g, kept, summed, inner, inner_stride, s);
    }
  });
  return out;
}

}  // namespace pyengine

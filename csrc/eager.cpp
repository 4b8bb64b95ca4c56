// The first stop of pyengine.functional's elementwise ops, add, mse_loss and binary_cross_entropy_with_logits
// (pyengine/ops/<op>.py), in C++. A call on a
// tiny tensor costs torch about 1.5 us; the Python route to the same kernel (argument checks, promotion, backend
// choice, pyengine/_backend.py compiled_autograd) cost as much again. Here the usual call is recognised and run,
// node included, in one step: floating tensors of one dtype, on a device whose kernels are built, with no tracer,
// no torch.func transform and no forward-mode dual tensor. Anything else returns None, and the Python function
// does the whole work (promotion, torch's errors, the python backend, torch.compile's and torch.func's routes),
// so no behaviour differs between the two. The Python side picks the set for the backend forced, if any, and
// none while torch.compile traces (pyengine/_backend.py eager_entries).
#include "eager.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <cmath>
#include <cstring>
#include <optional>

#include "autograd.h"

namespace pyengine {
namespace eager {
namespace {

using MaybeTensor = std::optional<at::Tensor>;

template <Kernels K>
bool kernels_built_for(const at::Tensor& t) {
#ifdef PYENGINE_WITH_CUDA
  constexpr bool cuda = K != Kernels::kCpp;
#else
  constexpr bool cuda = false;
#endif
  return (K != Kernels::kCuda && t.is_cpu()) || (cuda && t.is_cuda());
}

// torch._C._are_functorch_transforms_active: a vmap, grad or jvp level is on this thread.
bool functorch_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// The usual call: a floating tensor the C++ kernels run, outside every tracer and transform, without a tangent
// (the C++ Functions have no jvp; the Python ones do).
template <Kernels K>
bool usual(const at::Tensor& t) {
  return t.defined() && at::isFloatingType(t.scalar_type()) && kernels_built_for<K>(t) && !functorch_active() &&
         !torch::jit::tracer::isTracing() && !t._fw_grad(/*level=*/0).defined();
}

// A Python int or float (not bool, not a tensor or other number type, which the Python functions judge).
std::optional<double> plain_number(pybind11::handle h) {
  if (PyFloat_CheckExact(h.ptr())) return PyFloat_AS_DOUBLE(h.ptr());
  if (PyLong_CheckExact(h.ptr())) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
    if (overflow == 0) return static_cast<double>(v);
  }
  return std::nullopt;
}

std::optional<at::Tensor> tensor(pybind11::handle h) {
  if (!THPVariable_Check(h.ptr())) return std::nullopt;
  return THPVariable_Unpack(h.ptr());
}

// Shapes that broadcast (the Python function raises torch's message for the rest).
bool broadcastable(at::IntArrayRef a, at::IntArrayRef b) {
  for (size_t i = 1; i <= std::min(a.size(), b.size()); ++i) {
    const int64_t m = a[a.size() - i], n = b[b.size() - i];
    if (m != n && m != 1 && n != 1) return false;
  }
  return true;
}

constexpr double kFloat16Max = 65504.0;

// A loss's reduction string as the kernels' code: 0 none, 1 mean, 2 sum (anything else: the Python function's
// error).
std::optional<int64_t> reduction_code(pybind11::handle h) {
  if (!PyUnicode_CheckExact(h.ptr())) return std::nullopt;
  const char* s = PyUnicode_AsUTF8(h.ptr());
  if (s == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  if (std::strcmp(s, "none") == 0) return 0;
  if (std::strcmp(s, "mean") == 0) return 1;
  if (std::strcmp(s, "sum") == 0) return 2;
  return std::nullopt;
}

// A loss's input and target as its kernels take them: one shape (torch warns and broadcasts others), one dtype,
// one device, outside autocast (which turns a loss's half operands into float32).
template <Kernels K>
bool usual_loss_operands(const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& target) {
  return input && target && usual<K>(*input) && usual<K>(*target) &&
         input->scalar_type() == target->scalar_type() && input->device() == target->device() &&
         input->sizes() == target->sizes() && !at::autocast::is_autocast_enabled(input->device().type());
}

}  // namespace

template <Kernels K>
MaybeTensor relu(pybind11::handle input) {
  const std::optional<at::Tensor> x = tensor(input);
  return x && usual<K>(*x) ? MaybeTensor(autograd::relu(*x)) : std::nullopt;
}
template <Kernels K>
MaybeTensor sigmoid(pybind11::handle input) {
  const std::optional<at::Tensor> x = tensor(input);
  return x && usual<K>(*x) ? MaybeTensor(autograd::sigmoid(*x)) : std::nullopt;
}
template <Kernels K>
MaybeTensor tanh(pybind11::handle input) {
  const std::optional<at::Tensor> x = tensor(input);
  return x && usual<K>(*x) ? MaybeTensor(autograd::tanh(*x)) : std::nullopt;
}
template <Kernels K>
MaybeTensor leaky_relu(pybind11::handle input, pybind11::handle negative_slope) {
  const std::optional<at::Tensor> x = tensor(input);
  const std::optional<double> slope = plain_number(negative_slope);
  return x && slope && usual<K>(*x) ? MaybeTensor(autograd::leaky_relu(*x, *slope)) : std::nullopt;
}

// input + alpha * other for two tensors of one floating dtype on one device, shapes broadcasting, a plain alpha
// (a float16 result with |alpha| past float16's range is left to the Python function, which raises torch's error).
template <Kernels K>
MaybeTensor add(pybind11::handle input, pybind11::handle other, pybind11::handle alpha) {
  const std::optional<at::Tensor> a = tensor(input), b = tensor(other);
  const std::optional<double> scale = plain_number(alpha);
  if (!a || !b || !scale || !usual<K>(*a) || !usual<K>(*b)) return std::nullopt;
  if (a->scalar_type() != b->scalar_type() || a->device() != b->device()) return std::nullopt;
  if (!broadcastable(a->sizes(), b->sizes())) return std::nullopt;
  if (a->scalar_type() == at::kHalf && std::abs(*scale) > kFloat16Max) return std::nullopt;
  return autograd::add(*a, *b, *scale);
}

// The losses' usual call: input and target alone (no weight, no deprecated size_average/reduce: the Python function
// checks those before it comes here) and a reduction string.
template <Kernels K>
MaybeTensor mse_loss(pybind11::handle input, pybind11::handle target, pybind11::handle reduction) {
  const std::optional<at::Tensor> x = tensor(input), y = tensor(target);
  const std::optional<int64_t> code = reduction_code(reduction);
  if (!code || !usual_loss_operands<K>(x, y)) return std::nullopt;
  return autograd::mse_loss(*x, *y, *code);
}
template <Kernels K>
MaybeTensor binary_cross_entropy_with_logits(pybind11::handle input, pybind11::handle target,
                                             pybind11::handle reduction) {
  const std::optional<at::Tensor> x = tensor(input), y = tensor(target);
  const std::optional<int64_t> code = reduction_code(reduction);
  if (!code || !usual_loss_operands<K>(x, y)) return std::nullopt;
  return autograd::binary_cross_entropy_with_logits(*x, *y, c10::nullopt, c10::nullopt, *code);
}

#define PYENGINE_EAGER_ENTRIES(K)                                                                          \
  template MaybeTensor relu<K>(pybind11::handle);                                                          \
  template MaybeTensor sigmoid<K>(pybind11::handle);                                                       \
  template MaybeTensor tanh<K>(pybind11::handle);                                                          \
  template MaybeTensor leaky_relu<K>(pybind11::handle, pybind11::handle);                                  \
  template MaybeTensor add<K>(pybind11::handle, pybind11::handle, pybind11::handle);                       \
  template MaybeTensor mse_loss<K>(pybind11::handle, pybind11::handle, pybind11::handle);                  \
  template MaybeTensor binary_cross_entropy_with_logits<K>(pybind11::handle, pybind11::handle, pybind11::handle);
PYENGINE_EAGER_ENTRIES(Kernels::kByDevice)
PYENGINE_EAGER_ENTRIES(Kernels::kCpp)
PYENGINE_EAGER_ENTRIES(Kernels::kCuda)
#undef PYENGINE_EAGER_ENTRIES

}  // namespace eager
}  // namespace pyengine

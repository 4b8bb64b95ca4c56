// The one binding file: every op's Python-visible signature (the kernels, routed by route.h to the CPU or CUDA
// one by the device of their first tensor; their C++ autograd Functions in pyengine._C.autograd), and the same
// kernels as torch.library operators. pyengine/_backend.py picks which backend runs.
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "autograd.h"
#include "common/checks.h"
#include "cpu/allocator.h"
#include "eager.h"
#include "route.h"

namespace pyengine {
namespace {

// torch's pybind11 caster cannot load a c10::Scalar from Python (it asserts), so numbers are converted here.
at::Scalar to_scalar(const pybind11::object& obj, const char* name) {
  if (PyBool_Check(obj.ptr())) return at::Scalar(obj.cast<bool>());
  if (PyLong_Check(obj.ptr()) || PyIndex_Check(obj.ptr())) return at::Scalar(pybind11::int_(obj).cast<int64_t>());
  if (PyFloat_Check(obj.ptr()) || PyNumber_Check(obj.ptr())) return at::Scalar(pybind11::float_(obj).cast<double>());
  throw pybind11::type_error(std::string(name) + " must be a real number, got " +
                             std::string(pybind11::str(pybind11::type::handle_of(obj).attr("__name__"))));
}

// add's kernels as Python sees them: alpha and scale any Python number
at::Tensor add_forward_number(const at::Tensor& input, const at::Tensor& other, const pybind11::object& alpha) {
  return add_forward(input, other, to_scalar(alpha, "alpha"));
}
at::Tensor add_backward_number(const at::Tensor& grad, std::vector<int64_t> shape, const pybind11::object& scale) {
  return add_backward(grad, shape, to_scalar(scale, "scale"));
}

bool with_cuda() {
#ifdef PYENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}


pybind11::dict cpu_cache_info() {
  const cpu::OutputCacheInfo info = cpu::output_cache_info();
  pybind11::dict d;
  d["cached_bytes"] = info.cached_bytes;
  d["cached_blocks"] = info.cached_blocks;
  d["in_use_bytes"] = info.in_use_bytes;
  d["in_use_blocks"] = info.in_use_blocks;
  d["hits"] = info.hits;
  d["misses"] = info.misses;
  d["limit_bytes"] = info.limit_bytes;
  return d;
}


// The same kernels as torch.library custom ops, torch.ops.pyengine.<name>, so that torch.compile, torch.export
// and opcheck see them as operators; pyengine/ops/_library.py adds their fake (shape) functions and autograd.
// Multi-output kernels return a tuple there (an undefined entry reaches Python as None).
template <size_t N, size_t... I>
auto first_n(const std::vector<at::Tensor>& v, std::index_sequence<I...>) {
  return std::make_tuple(v.at(I)...);
}

template <size_t N, auto Kernel>
struct AsTuple;
template <size_t N, typename... Args, std::vector<at::Tensor> (*Kernel)(Args...)>
struct AsTuple<N, Kernel> {
  static auto call(Args... args) { return first_n<N>(Kernel(args...), std::make_index_sequence<N>()); }
};

// A list with undefined entries (gradients not asked for) is a Tensor?[] to the dispatcher.
template <auto Kernel>
struct AsOptionalList;
template <typename... Args, std::vector<at::Tensor> (*Kernel)(Args...)>
struct AsOptionalList<Kernel> {
  static std::vector<std::optional<at::Tensor>> call(Args... args) {
    std::vector<std::optional<at::Tensor>> out;
    for (auto& t : Kernel(args...)) out.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
    return out;
  }
};

#define PE_LIBRARY_IMPL(suffix)                                                                                 \
  m.impl("linear_forward", &linear_forward##suffix);                                                          \
  m.impl("linear_backward", &AsTuple<3, &linear_backward##suffix>::call);                                     \
  m.impl("relu_forward", &relu_forward##suffix);                                                              \
  m.impl("relu_backward", &relu_backward##suffix);                                                            \
  m.impl("sigmoid_forward", &sigmoid_forward##suffix);                                                        \
  m.impl("sigmoid_backward", &sigmoid_backward##suffix);                                                      \
  m.impl("tanh_forward", &tanh_forward##suffix);                                                              \
  m.impl("tanh_backward", &tanh_backward##suffix);                                                            \
  m.impl("leaky_relu_forward", &leaky_relu_forward##suffix);                                                  \
  m.impl("leaky_relu_backward", &leaky_relu_backward##suffix);                                                \
  m.impl("add_forward", &add_forward##suffix);                                                                \
  m.impl("add_backward", &add_backward##suffix);                                                              \
  m.impl("cross_entropy_forward", &AsTuple<3, &cross_entropy_forward##suffix>::call);                         \
  m.impl("cross_entropy_backward", &cross_entropy_backward##suffix);                                          \
  m.impl("mse_loss_forward", &mse_loss_forward##suffix);                                                      \
  m.impl("mse_loss_backward", &AsTuple<2, &mse_loss_backward##suffix>::call);                                 \
  m.impl("mse_loss_forward_with_grad", &AsTuple<2, &mse_loss_forward_with_grad##suffix>::call);               \
  m.impl("binary_cross_entropy_with_logits_forward", &binary_cross_entropy_with_logits_forward##suffix);      \
  m.impl("binary_cross_entropy_with_logits_backward",                                                       \
         &AsTuple<2, &binary_cross_entropy_with_logits_backward##suffix>::call);                               \
  m.impl("binary_cross_entropy_with_logits_forward_with_grad",                                              \
         &AsTuple<2, &binary_cross_entropy_with_logits_forward_with_grad##suffix>::call);                      \
  m.impl("fused_mlp_forward", &fused_mlp_forward##suffix);                                                    \
  m.impl("fused_mlp_backward", &AsOptionalList<&fused_mlp_backward##suffix>::call);                        \
  m.impl("linear_cross_entropy_forward", &AsTuple<6, &linear_cross_entropy_forward##suffix>::call);          \
  m.impl("linear_cross_entropy_backward", &AsTuple<3, &linear_cross_entropy_backward##suffix>::call);        \
  m.impl("cross_entropy_forward_with_grad", &AsTuple<3, &cross_entropy_forward_with_grad##suffix>::call);

// One set of pyengine._C.eager's entries (csrc/eager.h).
template <eager::Kernels K>
void def_eager_entries(py::module_ entries) {
  entries.def("relu", &eager::relu<K>, py::arg("input"));
  entries.def("sigmoid", &eager::sigmoid<K>, py::arg("input"));
  entries.def("tanh", &eager::tanh<K>, py::arg("input"));
  entries.def("leaky_relu", &eager::leaky_relu<K>, py::arg("input"), py::arg("negative_slope"));
  entries.def("add", &eager::add<K>, py::arg("input"), py::arg("other"), py::arg("alpha"));
  entries.def("mse_loss", &eager::mse_loss<K>, py::arg("input"), py::arg("target"), py::arg("reduction"));
  entries.def("binary_cross_entropy_with_logits", &eager::binary_cross_entropy_with_logits<K>, py::arg("input"),
              py::arg("target"), py::arg("reduction"));
}

}  // namespace
}  // namespace pyengine

TORCH_LIBRARY(pyengine, m) {
  m.def("linear_forward(Tensor x, Tensor weight, Tensor? bias=None, int activation=0) -> Tensor");
  m.def("linear_backward(Tensor grad_y, Tensor x, Tensor weight, bool need_x=True, bool need_weight=True, "
        "bool need_bias=True, int activation=0, Tensor? y=None) -> (Tensor, Tensor, Tensor)");
  m.def("relu_forward(Tensor x) -> Tensor");
  m.def("relu_backward(Tensor grad_y, Tensor y) -> Tensor");
  m.def("sigmoid_forward(Tensor x) -> Tensor");
  m.def("sigmoid_backward(Tensor grad_y, Tensor y) -> Tensor");
  m.def("tanh_forward(Tensor x) -> Tensor");
  m.def("tanh_backward(Tensor grad_y, Tensor y) -> Tensor");
  m.def("leaky_relu_forward(Tensor x, float negative_slope=0.01) -> Tensor");
  m.def("leaky_relu_backward(Tensor grad_y, Tensor x, float negative_slope=0.01) -> Tensor");
  m.def("add_forward(Tensor input, Tensor other, Scalar alpha=1) -> Tensor");
  m.def("add_backward(Tensor grad, int[] shape, Scalar scale=1) -> Tensor");
  m.def("cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight=None, int ignore_index=-100, "
        "int reduction=1, float label_smoothing=0.0) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
        "Tensor denom, int ignore_index=-100, int reduction=1, float label_smoothing=0.0) -> Tensor");
  m.def("mse_loss_forward(Tensor input, Tensor target, int reduction=1) -> Tensor");
  m.def("mse_loss_backward(Tensor grad_loss, Tensor input, Tensor target, int reduction=1, bool need_input=True, "
        "bool need_target=True) -> (Tensor, Tensor)");
  m.def("mse_loss_forward_with_grad(Tensor input, Tensor target, int reduction=1) -> (Tensor, Tensor)");
  m.def("binary_cross_entropy_with_logits_forward(Tensor input, Tensor target, Tensor? weight=None, "
        "Tensor? pos_weight=None, int reduction=1) -> Tensor");
  m.def("binary_cross_entropy_with_logits_backward(Tensor grad_loss, Tensor input, Tensor target, "
        "Tensor? weight=None, Tensor? pos_weight=None, int reduction=1, bool need_input=True, "
        "bool need_target=True) -> (Tensor, Tensor)");
  m.def("binary_cross_entropy_with_logits_forward_with_grad(Tensor input, Tensor target, Tensor? weight=None, "
        "Tensor? pos_weight=None, int reduction=1) -> (Tensor, Tensor)");
  m.def("fused_mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, int activation=1, "
        "int output_activation=0) -> Tensor[]");
  m.def("fused_mlp_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] hidden, Tensor y, int activation, "
        "int output_activation, bool need_x=True, bool need_weights=True, bool need_biases=True) -> Tensor?[]");
  m.def("linear_cross_entropy_forward(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
        "int reduction, float label_smoothing, bool need_x, bool need_weight, bool need_bias, int chunk_bytes) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor lse, int ignore_index, float label_smoothing, bool need_x, bool need_weight, bool need_bias, "
        "int chunk_bytes) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_forward_with_grad(Tensor logits, Tensor target, Tensor? weight=None, int ignore_index=-100, "
        "int reduction=1, float label_smoothing=0.0) -> (Tensor, Tensor, Tensor)");
}

// The CPU kernels through route.h, which calls the build of them chosen for this CPU (csrc/cpu_capability.cpp).
TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  using namespace pyengine;
  PE_LIBRARY_IMPL()
}

#ifdef PYENGINE_WITH_CUDA
TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  using namespace pyengine;
  PE_LIBRARY_IMPL(_cuda)
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pyengine;
  namespace py = pybind11;
  m.doc() = "pyengine's compiled kernels (see pyengine/ops/*.py for the Python reference of each formula)";

  m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::arg("activation") = 0);
  m.def("linear_backward", &linear_backward, py::arg("grad_y"), py::arg("x"), py::arg("weight"),
        py::arg("need_x") = true, py::arg("need_weight") = true, py::arg("need_bias") = true,
        py::arg("activation") = 0, py::arg("y") = py::none());
  m.def("relu_forward", &relu_forward, py::arg("x"));
  m.def("relu_backward", &relu_backward, py::arg("grad_y"), py::arg("y"));
  m.def("sigmoid_forward", &sigmoid_forward, py::arg("x"));
  m.def("sigmoid_backward", &sigmoid_backward, py::arg("grad_y"), py::arg("y"));
  m.def("add_forward", &add_forward_number, py::arg("input"), py::arg("other"), py::arg("alpha") = 1);
  m.def("add_backward", &add_backward_number, py::arg("grad"), py::arg("shape"), py::arg("scale") = 1);
  m.def("cross_entropy_forward", &cross_entropy_forward, py::arg("logits"), py::arg("target"),
        py::arg("weight") = py::none(), py::arg("ignore_index") = -100, py::arg("reduction") = 1,
        py::arg("label_smoothing") = 0.0);
  m.def("cross_entropy_backward", &cross_entropy_backward, py::arg("grad_loss"), py::arg("logits"),
        py::arg("target"), py::arg("weight"), py::arg("lse"), py::arg("denom"), py::arg("ignore_index") = -100,
        py::arg("reduction") = 1, py::arg("label_smoothing") = 0.0);
  m.def("tanh_forward", &tanh_forward, py::arg("x"));
  m.def("tanh_backward", &tanh_backward, py::arg("grad_y"), py::arg("y"));
  m.def("leaky_relu_forward", &leaky_relu_forward, py::arg("x"), py::arg("negative_slope") = 0.01);
  m.def("leaky_relu_backward", &leaky_relu_backward, py::arg("grad_y"), py::arg("x"),
        py::arg("negative_slope") = 0.01);
  m.def("mse_loss_forward", &mse_loss_forward, py::arg("input"), py::arg("target"), py::arg("reduction") = 1);
  m.def("mse_loss_backward", &mse_loss_backward, py::arg("grad_loss"), py::arg("input"), py::arg("target"),
        py::arg("reduction") = 1, py::arg("need_input") = true, py::arg("need_target") = true);
  m.def("mse_loss_forward_with_grad", &mse_loss_forward_with_grad, py::arg("input"), py::arg("target"),
        py::arg("reduction") = 1);
  m.def("binary_cross_entropy_with_logits_forward", &binary_cross_entropy_with_logits_forward, py::arg("input"),
        py::arg("target"), py::arg("weight") = py::none(), py::arg("pos_weight") = py::none(),
        py::arg("reduction") = 1);
  m.def("binary_cross_entropy_with_logits_backward", &binary_cross_entropy_with_logits_backward,
        py::arg("grad_loss"), py::arg("input"), py::arg("target"), py::arg("weight") = py::none(),
        py::arg("pos_weight") = py::none(), py::arg("reduction") = 1, py::arg("need_input") = true,
        py::arg("need_target") = true);
  m.def("binary_cross_entropy_with_logits_forward_with_grad", &binary_cross_entropy_with_logits_forward_with_grad,
        py::arg("input"), py::arg("target"), py::arg("weight") = py::none(), py::arg("pos_weight") = py::none(),
        py::arg("reduction") = 1);
  m.def("fused_mlp_forward", &fused_mlp_forward, py::arg("x"), py::arg("weights"), py::arg("biases"),
        py::arg("activation") = 1, py::arg("output_activation") = 0);
  m.def("fused_mlp_backward", &fused_mlp_backward, py::arg("grad_y"), py::arg("x"), py::arg("weights"),
        py::arg("hidden"), py::arg("y"), py::arg("activation") = 1, py::arg("output_activation") = 0,
        py::arg("need_x") = true, py::arg("need_weights") = true, py::arg("need_biases") = true);

  m.def("linear_cross_entropy_forward", &linear_cross_entropy_forward, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("target"), py::arg("ignore_index") = -100, py::arg("reduction") = 1,
        py::arg("label_smoothing") = 0.0, py::arg("need_x") = true, py::arg("need_weight") = true,
        py::arg("need_bias") = true, py::arg("chunk_bytes") = int64_t{16} << 20);
  m.def("linear_cross_entropy_backward", &linear_cross_entropy_backward, py::arg("grad_loss"), py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("target"), py::arg("lse"), py::arg("ignore_index") = -100,
        py::arg("label_smoothing") = 0.0, py::arg("need_x") = true, py::arg("need_weight") = true,
        py::arg("need_bias") = true, py::arg("chunk_bytes") = int64_t{16} << 20);

  m.def("cross_entropy_forward_with_grad", &cross_entropy_forward_with_grad, py::arg("logits"), py::arg("target"),
        py::arg("weight") = py::none(), py::arg("ignore_index") = -100, py::arg("reduction") = 1,
        py::arg("label_smoothing") = 0.0);

  py::module_ ag = m.def_submodule("autograd", "The ops as C++ autograd Functions (csrc/autograd.cpp), for "
                                   "arguments already checked and promoted by pyengine.functional");
  ag.def("linear", &autograd::linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
         py::arg("activation") = 0);
  ag.def("relu", &autograd::relu, py::arg("x"));
  ag.def("sigmoid", &autograd::sigmoid, py::arg("x"));
  ag.def("tanh", &autograd::tanh, py::arg("x"));
  ag.def("leaky_relu", &autograd::leaky_relu, py::arg("x"), py::arg("negative_slope") = 0.01);
  ag.def("add", &autograd::add, py::arg("input"), py::arg("other"), py::arg("alpha") = 1.0);
  ag.def("mse_loss", &autograd::mse_loss, py::arg("input"), py::arg("target"), py::arg("reduction") = 1);
  ag.def("binary_cross_entropy_with_logits", &autograd::binary_cross_entropy_with_logits, py::arg("input"),
         py::arg("target"), py::arg("weight") = py::none(), py::arg("pos_weight") = py::none(),
         py::arg("reduction") = 1);
  ag.def("cross_entropy", &autograd::cross_entropy, py::arg("input"), py::arg("target"),
         py::arg("weight") = py::none(), py::arg("ignore_index") = -100, py::arg("reduction") = 1,
         py::arg("label_smoothing") = 0.0);
  ag.def("linear_cross_entropy", &autograd::linear_cross_entropy, py::arg("x"), py::arg("weight"), py::arg("bias"),
         py::arg("target"), py::arg("ignore_index"), py::arg("reduction"), py::arg("label_smoothing"),
         py::arg("chunk_bytes"));
  ag.def("fused_mlp", &autograd::fused_mlp, py::arg("x"), py::arg("weights"), py::arg("biases"),
         py::arg("activation") = 1, py::arg("output_activation") = 0);
  ag.def("fused_mlp_packed", &autograd::fused_mlp_packed, py::arg("x"), py::arg("params"), py::arg("widths"),
         py::arg("activation") = 1, py::arg("output_activation") = 0);
  ag.def("fused_mlp_training_step", &autograd::fused_mlp_training_step, py::arg("x"), py::arg("params"),
         py::arg("widths"), py::arg("activation"), py::arg("output_activation"), py::arg("target"), py::arg("loss"),
         py::arg("lr"));
  autograd::name_graph_nodes();
  ag.def("set_reference", &autograd::set_reference, py::arg("kernels"),
         "Registers the python backend's kernels, which a backward runs while autograd records it");

  def_eager_entries<eager::Kernels::kByDevice>(m.def_submodule(
      "eager", "The functional ops' usual calls in one step (csrc/eager.cpp): the result, graph node included, or "
               "None where the Python function must decide; the tensors' device picks the kernels"));
  def_eager_entries<eager::Kernels::kCpp>(
      m.def_submodule("eager_cpp", "pyengine._C.eager inside use_backend('cpp'): CPU tensors only"));
  def_eager_entries<eager::Kernels::kCuda>(
      m.def_submodule("eager_cuda", "pyengine._C.eager inside use_backend('cuda'): CUDA tensors only"));

  m.def("with_cuda", &with_cuda, "True when this build contains the CUDA kernels");
  m.def("simd_level", &cpu_kernels_name,
        "The instruction set of the CPU kernels that run here (DEFAULT, AVX2 or AVX512), chosen at the first call");
  m.def("cpu_kernels_built", &cpu_kernels_built, "The instruction sets this build has CPU kernels for");

  // The cache of large CPU outputs (cpu/allocator.h); pyengine/_cpu_cache.py documents them for users.
  m.def("cpu_cache_info", &cpu_cache_info, "Counters of the CPU output cache, as a dict");
  m.def("empty_cpu_cache", &cpu::empty_output_cache, "Frees every block the CPU output cache keeps");
  m.def("set_cpu_cache_limit", &cpu::set_output_cache_limit, py::arg("nbytes"),
        "Caps the bytes the CPU output cache keeps (0: no caching), freeing the oldest blocks beyond it");
}

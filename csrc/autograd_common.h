// Pieces the C++ autograd Functions of autograd.cpp and autograd_fused_mlp.cpp share.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_cpp_function.h>

#include <string>

namespace pyengine {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradients of an op with no double backward, when autograd records its backward (create_graph=True), as
// pyengine/ops/_function.py first_order_only gives the Python Functions: attached to a node that raises
// `op has no double backward` when differentiated, with the saved tensors that want gradients linked to it too,
// so that a gradient asked of them raises instead of finding them unused.
inline variable_list link_to_error(variable_list grads, const variable_list& saved, const char* op,
                                   const char* instead) {
  const size_t count = grads.size();
  for (at::Tensor& g : grads) {
    if (g.defined()) g = g.detach().requires_grad_();
  }
  for (const at::Tensor& t : saved) {
    if (t.defined() && t.requires_grad()) grads.push_back(t);
  }
  const std::string message = std::string("pyengine.") + op + " has no double backward (its backward is not " +
                              "differentiable); use " + instead + " where a second derivative is needed";
  auto error = std::make_shared<torch::autograd::DelayedError>(message, static_cast<int64_t>(grads.size()));
  variable_list linked = (*error)(std::move(grads));
  linked.resize(count);
  return linked;
}

// Gives the graph nodes of Function a Python type named `name`: torch prints an unnamed C++ node as
// grad_fn=<name().rsplit("::")[-1]>, which for torch::autograd::CppNode<T> keeps the template's closing '>'
// ("CrossEntropyFunction>>"); registered, it prints as the Python Function's node does (type(grad_fn).__name__).
template <typename Function>
void name_graph_node(const char* name) {
  static PyTypeObject type{};  // one per Function: torch keeps the pointer
  torch::autograd::_initFunctionPyTypeObject(type, name, nullptr, nullptr);
  torch::autograd::registerCppFunction(typeid(torch::autograd::CppNode<Function>), &type);
}

// (M, K) with M the product of the leading dims (not numel / K: K may be 0)
inline at::Tensor as_matrix(const at::Tensor& x) {
  return x.dim() == 2 ? x : x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), x.size(-1)});
}

}  // namespace autograd
}  // namespace pyengine

// Pieces the C++ autograd Functions of autograd.cpp and autograd_fused_mlp.cpp share.
#pragma once

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_cpp_function.h>

#include <memory>
#include <string>
#include <type_traits>

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

// Gives a C++ node type (a Node subclass, or the CppNode of a Function) a Python type named `name`: torch prints
// an unnamed C++ node as grad_fn=<name().rsplit("::")[-1]>, which for a template keeps its closing '>'
// ("CrossEntropyFunction>>"); registered, it prints as the Python Function's node does (type(grad_fn).__name__).
template <typename Node>
void name_node_type(const char* name) {
  static PyTypeObject type{};  // one per node type: torch keeps the pointer
  torch::autograd::_initFunctionPyTypeObject(type, name, nullptr, nullptr);
  torch::autograd::registerCppFunction(typeid(Node), &type);
}
template <typename Function>
void name_graph_node(const char* name) {
  name_node_type<torch::autograd::CppNode<Function>>(name);
}

// A new graph node of type T, owned as this torch owns its nodes: c10::intrusive_ptr from torch 2.13 on,
// std::shared_ptr with torch's deleteNode (which frees long chains without deep recursion) before. Base keeps
// deleteNode a dependent name, found (by argument-dependent lookup) only where that branch is compiled.
template <typename T, typename Base = torch::autograd::Node>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, Base>) {
    return c10::make_intrusive<T>();
  } else {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(static_cast<Base*>(node)); });
  }
}

// Whether a call must build a graph node: grad mode is on and some tensor argument wants a gradient. When none
// does, the entries below run the forward kernel alone: a torch::autograd::Function's apply costs about 0.8 us
// even then (it makes the node, its context and the output records before it finds nothing to record).
inline bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool wants_grad(const c10::optional<at::Tensor>& t) { return t.has_value() && wants_grad(*t); }
inline bool wants_grad(at::TensorList ts) {
  for (const at::Tensor& t : ts) {
    if (wants_grad(t)) return true;
  }
  return false;
}
template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (wants_grad(tensors) || ...);
}

// (M, K) with M the product of the leading dims (not numel / K: K may be 0)
inline at::Tensor as_matrix(const at::Tensor& x) {
  return x.dim() == 2 ? x : x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), x.size(-1)});
}

}  // namespace autograd
}  // namespace pyengine

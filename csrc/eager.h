// pyengine._C.eager: the functional ops' usual calls in one C++ step (eager.cpp), None for every other call.
// Three sets of them: for calls whose tensors' device picks the backend, and for calls inside
// use_backend('cpp') or use_backend('cuda'), which take only that backend's device.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <optional>

namespace pyengine {
namespace eager {

// The kernels a set of entries may run: the tensors' device's, or one backend's alone.
enum class Kernels { kByDevice, kCpp, kCuda };

template <Kernels K>
std::optional<at::Tensor> relu(pybind11::handle input);
template <Kernels K>
std::optional<at::Tensor> sigmoid(pybind11::handle input);
template <Kernels K>
std::optional<at::Tensor> tanh(pybind11::handle input);
template <Kernels K>
std::optional<at::Tensor> leaky_relu(pybind11::handle input, pybind11::handle negative_slope);
template <Kernels K>
std::optional<at::Tensor> add(pybind11::handle input, pybind11::handle other, pybind11::handle alpha);
template <Kernels K>
std::optional<at::Tensor> mse_loss(pybind11::handle input, pybind11::handle target, pybind11::handle reduction);
template <Kernels K>
std::optional<at::Tensor> binary_cross_entropy_with_logits(pybind11::handle input, pybind11::handle target,
                                                           pybind11::handle reduction);

}  // namespace eager
}  // namespace pyengine

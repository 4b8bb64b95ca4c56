// pyengine._C.eager: the functional ops' usual calls in one C++ step (eager.cpp), None for every other call.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <optional>

namespace pyengine {
namespace eager {

std::optional<at::Tensor> relu(pybind11::handle input);
std::optional<at::Tensor> sigmoid(pybind11::handle input);
std::optional<at::Tensor> tanh(pybind11::handle input);
std::optional<at::Tensor> leaky_relu(pybind11::handle input, pybind11::handle negative_slope);
std::optional<at::Tensor> add(pybind11::handle input, pybind11::handle other, pybind11::handle alpha);

}  // namespace eager
}  // namespace pyengine

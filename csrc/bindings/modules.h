// The bindings, one function per layer; module.cpp registers them all as
// deepspeed_pipe_ext._C.
#pragma once

#include <pybind11/pybind11.h>

namespace dpe::bindings {

void bind_core(pybind11::module_& m);     // csrc/core (core.cpp)
void bind_planner(pybind11::module_& m);  // csrc/core/planner (planner.cpp)
void bind_runtime(pybind11::module_& m);  // csrc/runtime (runtime.cpp)

}  // namespace dpe::bindings

// deepspeed_pipe_ext._C: registration only. The logic lives in csrc/core and
// csrc/runtime; conversions between Python and C++ values in convert.cpp.
// pybind11 maps std::invalid_argument to ValueError.
#include <torch/extension.h>

#include "bindings/modules.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepspeed_pipe_ext's compiled core (csrc/core) and runtime (csrc/runtime)";
  dpe::bindings::bind_core(m);
  dpe::bindings::bind_planner(m);
  dpe::bindings::bind_runtime(m);
}

// The one bindings file: exposes csrc/core (and later csrc/runtime) to Python
// as deepspeed_pipe_ext._C. pybind11 maps std::invalid_argument to ValueError.
#include <torch/extension.h>

#include <pybind11/stl.h>

#include "core/partition.h"
#include "core/topology.h"

namespace py = pybind11;
using dpe::core::Topology;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepspeed_pipe_ext compiled core: partition solver and topology rank math";

  m.def("partition_uniform", &dpe::core::partition_uniform, py::arg("num_items"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("partition_balanced", &dpe::core::partition_balanced, py::arg("weights"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("partition_minmax", &dpe::core::partition_minmax, py::arg("weights"), py::arg("num_parts"),
        py::call_guard<py::gil_scoped_release>());
  m.def("max_part_weight", &dpe::core::max_part_weight, py::arg("weights"), py::arg("parts"));
  m.def("check_weights", &dpe::core::check_weights, py::arg("weights"));
  m.def("prime_factors", &dpe::core::prime_factors, py::arg("n"));

  py::class_<Topology>(m, "Topology")
      .def(py::init<std::vector<std::string>, std::vector<int64_t>>(), py::arg("axes"), py::arg("dims"))
      .def_property_readonly("axes", &Topology::axes)
      .def_property_readonly("dims", &Topology::dims)
      .def("world_size", &Topology::world_size)
      .def("axis_index", &Topology::axis_index, py::arg("axis"))
      .def("dim", &Topology::dim, py::arg("axis"))
      .def("rank", &Topology::rank, py::arg("coord"))
      .def("coord", &Topology::coord, py::arg("rank"))
      .def("axis_comm_lists", &Topology::axis_comm_lists, py::arg("axis"))
      .def("filter_match", &Topology::filter_match, py::arg("partial"))
      .def("axis_list", &Topology::axis_list, py::arg("axis"), py::arg("idx"))
      .def("rank_repr", &Topology::rank_repr, py::arg("rank"), py::arg("omit_axes"), py::arg("inner_sep"),
           py::arg("outer_sep"))
      .def("ring_pairs", &Topology::ring_pairs, py::arg("axis"));
}

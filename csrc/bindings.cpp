// The Python module ftte_core._kernels. Each kernel family registers its own functions
// (bind_*.cpp); this file only holds what they share.
#include <pybind11/pybind11.h>

#include "parallel.h"
#include "workspace.h"

namespace py = pybind11;

void register_dense(py::module_& m);
void register_conv(py::module_& m);
void register_codec(py::module_& m);
void register_graph_ops(py::module_& m);
void register_depthwise(py::module_& m);

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "FTTE C++ kernels: masked dense/conv forward+backward, pooling, activations, loss, "
            "SGD on selected rows, int8/int4 delta codec, weighted merge.";
  m.def("set_num_threads", &ftte::set_num_threads, py::arg("n"),
        "Threads used by kernels; n <= 0 restores the default (all CPUs this process may use).");
  m.def("get_num_threads", &ftte::get_num_threads);
  m.def("default_num_threads", &ftte::default_num_threads);
  m.def("workspace_current_bytes", &ftte::workspace_current_bytes,
        "Bytes of kernel scratch memory allocated right now.");
  m.def("workspace_peak_bytes", &ftte::workspace_peak_bytes,
        "Most kernel scratch memory held at once since the last reset_workspace_peak().");
  m.def("reset_workspace_peak", &ftte::workspace_reset_peak);
  register_dense(m);
  register_conv(m);
  register_codec(m);
  register_graph_ops(m);
  register_depthwise(m);
}

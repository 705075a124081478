// Every xlsparse op schema, one block per family. Kernels register in csrc/cpu and csrc/cuda;
// fake (meta) impls and autograd live beside the Python wrappers in xlsparse/ops.
#include <Python.h>
#include <torch/library.h>

// A module object so `import xlsparse._C` loads this library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(xlsparse, m) {
  // --- compose: sparse-diff composition ---
  // dense.view(-1)[indices] += alpha * values, indices sorted and unique.
  m.def("sparse_axpy_(Tensor(a!) dense, Tensor indices, Tensor values, float alpha) -> ()");
}

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
  // Many deltas on many tensors in one call: entry e adds alphas[e] * values[e] at indices[e] of
  // dense[target[e]]. Deltas that share an element are summed in the accumulation type and stored
  // once. saved[e] receives the values entry e displaced (for restore_diffs_).
  m.def("apply_diffs_(Tensor(a!)[] dense, Tensor[] indices, Tensor[] values, int[] target, float[] alphas, Tensor(b!)[] saved) -> ()");
  // dense[target[e]].view(-1)[indices[e]] = saved[e]: undoes apply_diffs_ bit-exactly.
  m.def("restore_diffs_(Tensor(a!)[] dense, Tensor[] indices, Tensor[] saved, int[] target) -> ()");
  // Union of sorted supports with values sum_i weights[i] * values[i]: linear time, no densifying.
  m.def("merge_deltas(Tensor[] indices, Tensor[] values, float[] weights, int numel) -> (Tensor, Tensor)");
  // Bool masks of the k largest |x| over all tensors together; ties go to the lowest flat
  // position, earlier tensors first.
  m.def("topk_masks(Tensor[] tensors, int k) -> Tensor[]");
}

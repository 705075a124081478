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

  // --- matmul: multi-mask gated matmuls and expert-ensemble mixing ---
  // Δ = (indices, values) of an [O, I] weight, row-major, sorted and unique. Tokens are the
  // positions token_index[token_bounds[0]:token_bounds[1]] (all when absent), scaled by
  // token_scale[t] (1 when absent).
  // SDDMM: out[n] = sum_t s_t * grad_out[t, indices[n] / I] * x[t, indices[n] % I].
  m.def("sddmm(Tensor grad_out, Tensor x, Tensor indices, Tensor? token_index, Tensor? token_bounds, "
        "Tensor? token_scale) -> Tensor");
  // SpMM: out += s * x @ delta.T (out [T, O], x [T, I]); transpose: out += s * x @ delta (out [T, I], x [T, O]).
  m.def("spmm_(Tensor(a!) out, Tensor x, Tensor indices, Tensor values, Tensor? token_index, "
        "Tensor? token_bounds, Tensor? token_scale, bool transpose) -> ()");
  // Mixture of E experts' logits [E, T, V] with log-weights [T, E]: log-probs [T, V] and the
  // per-expert (prob space, [E, T]) or mixed (logit space, [1, T]) logsumexp saved for backward.
  m.def("ensemble_logprobs(Tensor logits, Tensor log_weights, bool prob_space) -> (Tensor, Tensor)");
  m.def("ensemble_logprobs_backward(Tensor grad, Tensor logits, Tensor log_weights, Tensor out, Tensor lse, "
        "bool prob_space) -> (Tensor, Tensor)");
  // The same mixture's negative log-likelihood of targets [T]: nll [T] and the logsumexp.
  m.def("ensemble_nll(Tensor logits, Tensor log_weights, Tensor targets, bool prob_space) -> (Tensor, Tensor)");
  m.def("ensemble_nll_backward(Tensor grad, Tensor logits, Tensor log_weights, Tensor targets, Tensor nll, "
        "Tensor lse, bool prob_space) -> (Tensor, Tensor)");
}

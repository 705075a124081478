// Every xlsparse op schema, one block per family. Kernels register in csrc/cpu and csrc/cuda;
// fake (meta) impls and autograd live beside the Python wrappers in xlsparse/ops.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "xlsparse/cpu_kernels.h"

// _C.cpu_capability(): the CPU kernel set in use ("default", "avx2" or "avx512"); a ValueError
// when XLSPARSE_CPU_CAPABILITY asks for one that is unknown or that the CPU cannot run.
static PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(xlsparse::cpu_capability_name());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// A module object so `import xlsparse._C` loads this library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {{"cpu_capability", cpu_capability, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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

  // --- optim: masked-gradient updates ---
  // One AdamW step of every param at the entries its selector chooses: None = all entries, a bool
  // mask of the param's shape, or sorted flat int32/int64 indices (then the state tensors and
  // inits hold one value per index). steps[i]: a one-element float32 count for the tensor or an
  // int32 count per state entry; the op advances them. inits (l1_to_init != 0): the initial values.
  // AMP: grads are divided by grad_scale; nothing changes when found_inf is nonzero.
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] selectors, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor?[] inits, float lr, "
        "float beta1, float beta2, float eps, float weight_decay, float l1_to_init, bool amsgrad, "
        "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The same for SGD (momentum_buffers empty when momentum == 0).
  m.def("masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor?[] selectors, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] steps, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // dW = sum_l masks[l] * (grad_out[tokens_l]^T input[tokens_l]), tokens_l = order[offsets[l]:offsets[l+1]].
  m.def("multi_mask_weight_grad(Tensor grad_out, Tensor input, Tensor masks, Tensor order, Tensor offsets) -> Tensor");

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
  // The same for E deltas over all tokens, each scaled by its column of gates [T, E], in one pass:
  // out += sum_e gates[:, e] * x @ delta_e.T (transpose: x @ delta_e). CPU only; elsewhere one spmm_ per delta.
  m.def("spmm_gated_(Tensor(a!) out, Tensor x, Tensor[] indices, Tensor[] values, Tensor gates, bool transpose) -> ()");
  // Mixture of E experts' logits [E, T, V] with log-weights [T, E]: log-probs [T, V] and the
  // per-expert (prob space, [E, T]) or mixed (logit space, [1, T]) logsumexp saved for backward.
  m.def("ensemble_logprobs(Tensor logits, Tensor log_weights, bool prob_space) -> (Tensor, Tensor)");
  m.def("ensemble_logprobs_backward(Tensor grad, Tensor logits, Tensor log_weights, Tensor out, Tensor lse, "
        "bool prob_space) -> (Tensor, Tensor)");
  // The same mixture's negative log-likelihood of targets [T]: nll [T] and the logsumexp, both in
  // the accumulation dtype (the prob-space backward's posterior reads nll); its grad is in that dtype too.
  m.def("ensemble_nll(Tensor logits, Tensor log_weights, Tensor targets, bool prob_space) -> (Tensor, Tensor)");
  m.def("ensemble_nll_backward(Tensor grad, Tensor logits, Tensor log_weights, Tensor targets, Tensor nll, "
        "Tensor lse, bool prob_space) -> (Tensor, Tensor)");
}

// The ops that write their (a!) arguments bump those tensors' version counters, as torch's own
// in-place ops do, whoever calls them: a direct torch.ops.xlsparse call once left a tensor that
// autograd had saved changed with its counter unmoved, and the backward used the new values.
// (torch's autogradNotImplementedInplaceOrViewFallback handles views only.) Inference tensors
// have no counter.
static void bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n = schema.arguments().size();
  std::vector<at::Tensor> written;  // taken before the kernel pops its arguments
  for (size_t i = 0; i < n; ++i) {
    if (!schema.is_mutable({c10::SchemaArgType::input, i})) continue;
    const c10::IValue& arg = (*stack)[stack->size() - n + i];
    if (arg.isTensor()) {
      written.push_back(arg.toTensor());
    } else if (arg.isTensorList()) {
      for (const at::Tensor& t : arg.toTensorList()) written.push_back(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : written)
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

TORCH_LIBRARY_IMPL(xlsparse, ADInplaceOrView, m) {
  for (const char* op : {"sparse_axpy_", "apply_diffs_", "restore_diffs_", "masked_adamw_", "masked_sgd_", "spmm_",
                         "spmm_gated_"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_written>());
}

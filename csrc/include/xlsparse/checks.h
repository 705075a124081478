// The argument checks of every C++ entry point, CPU and CUDA: the one place they are written.
//
// The Python wrappers (xlsparse/ops/checks.py) validate every argument before any backend runs
// and give the documented errors. What stays here guards the raw pointers of a direct
// `torch.ops.xlsparse.*` call: dtypes the kernels are built for, shapes and layouts they index,
// devices, and index/token values they dereference (with the order the merge kernels rely on).
// Messages name the op and the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "xlsparse/common.h"

namespace xlsparse {

// The value dtypes the kernels are built for (XLS_DISPATCH_FLOATS): not float8 or complex.
inline bool is_value_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// dense is the tensor written in place; indices index dense.view(-1); values pair with indices.
inline void check_sparse_update(const char* op, const at::Tensor& dense, const at::Tensor& indices,
                                const at::Tensor& values) {
  TORCH_CHECK_VALUE(dense.is_contiguous(), op, ": dense must be contiguous");
  TORCH_CHECK_VALUE(indices.dim() == 1 && values.dim() == 1, op, ": indices and values must be 1-D, got ",
              indices.sizes(), " and ", values.sizes());
  TORCH_CHECK_VALUE(indices.numel() == values.numel(), op, ": indices has ", indices.numel(),
              " entries but values has ", values.numel());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(is_value_dtype(dense.scalar_type()), op, ": dense must be floating point, got ",
                   dense.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == dense.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " does not match dense dtype ", dense.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == dense.device() && values.device() == dense.device(), op,
              ": dense, indices and values must be on one device, got ", dense.device(), ", ",
              indices.device(), ", ", values.device());
}

// The error for the first bad index of an entry: `value` at `pos`, after `prev` (when pos > 0).
[[noreturn]] inline void raise_bad_index(const std::string& where, int64_t pos, int64_t value, int64_t prev,
                                         int64_t numel) {
  TORCH_CHECK_INDEX(value >= 0 && value < numel, where, ": index ", value, " at position ", pos,
                    " is out of range [0, ", numel, ")");
  TORCH_CHECK_VALUE(false, where, ": indices must be sorted and unique; position ", pos, " holds ", value, " after ", prev);
}

// The first position i in [begin, end) of p where p[i] is outside [0, numel) or not above
// p[i - 1], or -1. Checked a block at a time without branches, then a failing block again
// position by position: the loop that returned at the first bad index did not vectorize and took
// 11% of an apply + restore of e5-small's real 5% diff (one thread). In a block whose entries
// increase from p[b - 1], the first and last entries bound all of them.
template <typename index_t>
int64_t first_bad_index(const index_t* p, int64_t begin, int64_t end, int64_t numel) {
  constexpr int64_t kBlock = 1 << 10;
  auto bad = [&](int64_t i) { return p[i] < 0 || p[i] >= numel || (i > 0 && p[i - 1] >= p[i]); };
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    int increasing = 1;
    for (int64_t i = std::max<int64_t>(b, 1); i < e; ++i) increasing &= static_cast<int>(p[i - 1] < p[i]);
    if (increasing && p[b] >= 0 && p[e - 1] < numel) continue;
    for (int64_t i = b; i < e; ++i)
      if (bad(i)) return i;
  }
  return -1;
}

// Indices must be strictly increasing (sorted, no duplicates) and inside [0, numel). Checked before
// any write so that bad input never leaves a half-updated tensor. On CPU it is one parallel pass.
inline void check_indices(const char* op, const at::Tensor& indices, int64_t numel) {
  const int64_t k = indices.numel();
  if (k == 0) return;
  if (!indices.is_cpu()) {
    // One read back of (min, max, sorted and unique?): each read is a host sync on a GPU, and a
    // masked step over 65 tensors made 196 of them (an H200 profile, with three reads a tensor).
    const auto summary = at::stack({indices.min().to(at::kLong), indices.max().to(at::kLong),
                                    (indices.slice(0, 1) > indices.slice(0, 0, k - 1)).all().to(at::kLong)})
                             .cpu();
    const int64_t* s = summary.data_ptr<int64_t>();
    const int64_t lo = s[0], hi = s[1];
    TORCH_CHECK_INDEX(lo >= 0 && hi < numel, op, ": indices out of range [0, ", numel, "): min ", lo, ", max ", hi);
    TORCH_CHECK_VALUE(s[2] != 0, op, ": indices must be sorted and unique");
    return;
  }
  auto idx = indices.contiguous();
  XLS_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
    const index_t* p = idx.data_ptr<index_t>();
    std::atomic<int64_t> first{k};  // the first bad position over all threads' ranges
    at::parallel_for(0, k, 1 << 16, [&](int64_t begin, int64_t end) {
      const int64_t i = first_bad_index(p, begin, end, numel);
      if (i < 0) return;
      int64_t seen = first.load();
      while (i < seen && !first.compare_exchange_weak(seen, i)) {  // a failed exchange reloads seen
      }
    });
    const int64_t i = first.load();
    if (i < k) raise_bad_index(op, i, p[i], i > 0 ? p[i - 1] : 0, numel);
  });
}

// Entry e pairs indices[e] and values[e] with dense[target[e]]. The metadata of every entry is
// checked here; the index values (sorted, unique, in range) in one batched pass per backend
// (check_entry_indices), before anything is written. Messages name the entry.
inline void check_diff_entries(const char* op, at::TensorList dense, at::TensorList indices, at::TensorList values,
                               at::IntArrayRef target) {
  const int64_t n = static_cast<int64_t>(indices.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == n && static_cast<int64_t>(target.size()) == n, op,
                    ": indices, values and target must have one entry each, got ", n, ", ", values.size(), ", ",
                    target.size());
  // A kernel reads every tensor's pointer on one device (a GPU would fault on another's memory).
  for (size_t t = 1; t < dense.size(); ++t) {
    TORCH_CHECK_VALUE(dense[t].device() == dense[0].device(), op, ": the dense tensors must be on one device, got ",
                      dense[0].device(), " and ", dense[t].device(), " (dense[", t,
                      "]); call once per device, as xlsparse.apply does");
  }
  std::vector<at::ScalarType> index_type(dense.size(), at::kByte);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t t = target[e];
    TORCH_CHECK_INDEX(t >= 0 && t < static_cast<int64_t>(dense.size()), op, ": target[", e, "] = ", t,
                      " is not a position in dense (", dense.size(), " tensors)");
    const std::string where = std::string(op) + " entry " + std::to_string(e) + " (dense[" + std::to_string(t) + "])";
    check_sparse_update(where.c_str(), dense[t], indices[e], values[e]);
    TORCH_CHECK_TYPE(index_type[t] == at::kByte || index_type[t] == indices[e].scalar_type(), where,
                     ": every entry of one tensor must use one index dtype");
    index_type[t] = indices[e].scalar_type();
  }
}

inline std::string entry_name(const char* op, int64_t e, int64_t t) {
  return std::string(op) + " entry " + std::to_string(e) + " (dense[" + std::to_string(t) + "])";
}

// apply_diffs_'s alphas and saved outputs: one per entry; saved[e] is contiguous, like values[e].
inline void check_saved(const char* op, at::TensorList values, at::ArrayRef<double> alphas, at::TensorList saved) {
  TORCH_CHECK_VALUE(alphas.size() == values.size() && saved.size() == values.size(), op, ": alphas and saved need ",
                    values.size(), " entries, got ", alphas.size(), " and ", saved.size());
  for (size_t e = 0; e < values.size(); ++e)
    TORCH_CHECK_VALUE(saved[e].is_contiguous() && saved[e].numel() == values[e].numel() &&
                          saved[e].scalar_type() == values[e].scalar_type() && saved[e].device() == values[e].device(),
                      op, ": saved[", e, "] must be a contiguous tensor like values[", e, "]");
}

// a [T, A] and b [T, B] share dtype, device and T; indices address a [A, B] (or [B, A]) delta.
inline void check_token_matmul(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                               const c10::optional<at::Tensor>& token_index,
                               const c10::optional<at::Tensor>& token_bounds,
                               const c10::optional<at::Tensor>& token_scale) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": expected 2-D token matrices, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), op, ": token counts differ: ", a.size(0), " and ", b.size(0));
  TORCH_CHECK_TYPE(is_value_dtype(a.scalar_type()), op, ": expected floating point, got ", a.scalar_type());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": dtypes differ: ", a.scalar_type(), " and ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, op, ": indices must be 1-D, got ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device() && indices.device() == a.device(), op,
                    ": tensors must be on one device, got ", a.device(), ", ", b.device(), ", ", indices.device());
  if (token_index.has_value()) {
    const auto& ti = *token_index;
    TORCH_CHECK_TYPE(ti.scalar_type() == at::kLong, op, ": token_index must be int64, got ", ti.scalar_type());
    TORCH_CHECK_VALUE(ti.dim() == 1 && ti.device() == a.device(), op, ": token_index must be 1-D on ", a.device());
  }
  if (token_bounds.has_value()) {
    const auto& tb = *token_bounds;
    TORCH_CHECK_VALUE(token_index.has_value(), op, ": token_bounds needs token_index");
    TORCH_CHECK_TYPE(tb.scalar_type() == at::kLong, op, ": token_bounds must be int64, got ", tb.scalar_type());
    TORCH_CHECK_VALUE(tb.numel() == 2 && tb.device() == a.device(), op, ": token_bounds must hold 2 entries on ",
                      a.device());
  }
  if (token_scale.has_value()) {
    const auto& ts = *token_scale;
    TORCH_CHECK_TYPE(is_value_dtype(ts.scalar_type()), op, ": token_scale must be floating point");
    TORCH_CHECK_VALUE(ts.dim() == 1 && ts.size(0) == a.size(0) && ts.device() == a.device(), op,
                      ": token_scale must have shape [", a.size(0), "] on ", a.device(), ", got ", ts.sizes());
  }
}

// Bounds inside token_index and the selected ids inside [0, T), summarised where the tensors live
// and read back once: one host sync on a GPU, where reading the bounds, then the min and max of
// the selection made three per matmul.
inline void check_token_values(const char* op, int64_t num_tokens, const c10::optional<at::Tensor>& token_index,
                               const c10::optional<at::Tensor>& token_bounds) {
  if (!token_index.has_value()) return;
  const int64_t n = token_index->numel();
  const auto opts = token_index->options().dtype(at::kLong);
  const at::Tensor lo_t = token_bounds.has_value() ? token_bounds->select(0, 0) : at::zeros({}, opts);
  const at::Tensor hi_t = token_bounds.has_value() ? token_bounds->select(0, 1) : at::full({}, n, opts);
  std::vector<at::Tensor> parts = {lo_t, hi_t};
  if (n > 0) {
    const auto position = at::arange(n, opts);
    const auto inside = position.ge(lo_t).logical_and(position.lt(hi_t));
    const int64_t big = std::numeric_limits<int64_t>::max();
    parts.push_back(inside.sum());
    parts.push_back(at::where(inside, *token_index, big).min());
    parts.push_back(at::where(inside, *token_index, -big).max());
  }
  const auto summary = at::stack(parts).to(at::kCPU);
  const int64_t* s = summary.data_ptr<int64_t>();
  TORCH_CHECK_INDEX(0 <= s[0] && s[0] <= s[1] && s[1] <= n, op, ": token_bounds [", s[0], ", ", s[1],
                    ") do not fit token_index of ", n, " entries");
  if (n > 0 && s[2] > 0)
    TORCH_CHECK_INDEX(s[3] >= 0 && s[4] < num_tokens, op, ": token_index holds ids outside [0, ", num_tokens, ")");
}

// logits [E, T, V], log_weights [T, E], targets [T] (when given).
inline void check_ensemble(const char* op, const at::Tensor& logits, const at::Tensor& log_weights,
                           const at::Tensor* targets) {
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be [E, T, V], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(0) > 0 && logits.size(2) > 0, op, ": logits need E > 0 experts and V > 0 classes");
  TORCH_CHECK_VALUE(log_weights.dim() == 2 && log_weights.size(0) == logits.size(1) &&
                        log_weights.size(1) == logits.size(0),
                    op, ": log_weights must be [T, E] = [", logits.size(1), ", ", logits.size(0), "], got ",
                    log_weights.sizes());
  TORCH_CHECK_TYPE(is_value_dtype(logits.scalar_type()), op, ": logits must be floating point");
  // float32 weights beside half logits: three uniform weights rounded to bfloat16 sum to 0.997
  TORCH_CHECK_TYPE(log_weights.scalar_type() == logits.scalar_type() || log_weights.scalar_type() == at::kFloat, op,
                   ": log_weights dtype ", log_weights.scalar_type(), " must be float32 or the logits dtype ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(log_weights.device() == logits.device(), op, ": logits and log_weights must be on one device");
  if (targets != nullptr) {
    TORCH_CHECK_TYPE(targets->scalar_type() == at::kLong, op, ": targets must be int64, got ", targets->scalar_type());
    TORCH_CHECK_VALUE(targets->dim() == 1 && targets->size(0) == logits.size(1), op, ": targets must be [",
                      logits.size(1), "], got ", targets->sizes());
    TORCH_CHECK_VALUE(targets->device() == logits.device(), op, ": targets must be on ", logits.device());
  }
}

// Which entries of a parameter a step touches: all of them, a bool mask, or sorted flat indices.
enum class Selection { All, Mask, Indices };

inline Selection selection_of(const std::optional<at::Tensor>& selector) {
  if (!selector.has_value() || !selector->defined()) return Selection::All;
  return selector->scalar_type() == at::kBool ? Selection::Mask : Selection::Indices;
}

// params[i] is updated at the entries chosen by selectors[i]; state tensors have one value per
// chosen entry in Indices mode (K) and one per parameter entry otherwise (N). steps[i] is a
// one-element float32 tensor (one count for the tensor) or an int32 tensor with one count per state
// entry. `states` are the state lists (exp_avg, ...) that must each match that layout; `inits`
// (l1_to_init) may be empty.
inline void check_masked_step(const char* op, const at::TensorList& params, const at::TensorList& grads,
                              const c10::List<std::optional<at::Tensor>>& selectors,
                              const std::vector<std::pair<const char*, at::TensorList>>& states,
                              const at::TensorList& steps, const c10::List<std::optional<at::Tensor>>& inits,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && selectors.size() == n && steps.size() == n, op,
                    ": params, grads, selectors and steps must have one entry per parameter, got ", n, ", ",
                    grads.size(), ", ", selectors.size(), ", ", steps.size());
  TORCH_CHECK_VALUE(inits.size() == 0 || inits.size() == n, op, ": inits must be empty or have ", n, " entries");
  for (const auto& s : states)
    TORCH_CHECK_VALUE(s.second.size() == n, op, ": ", s.first, " must have ", n, " entries, got ", s.second.size());
  for (const auto* scalar : {&grad_scale, &found_inf}) {
    if (!scalar->has_value()) continue;
    TORCH_CHECK_VALUE((*scalar)->numel() == 1 && (*scalar)->scalar_type() == at::kFloat, op,
                      ": grad_scale and found_inf must be one-element float32 tensors");
    TORCH_CHECK_VALUE(n == 0 || (*scalar)->device() == params[0].device(), op,
                      ": grad_scale and found_inf must be on the parameters' device");
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_TYPE(is_value_dtype(p.scalar_type()), op, ": params[", i, "] must be floating point, got ",
                     p.scalar_type());
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), op, ": every param of one call must have dtype ",
                     params[0].scalar_type(), "; params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_VALUE(p.device() == params[0].device(), op, ": every tensor must be on ", params[0].device());
    TORCH_CHECK_VALUE(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.sizes() == p.sizes() && g.is_contiguous() && g.device() == p.device(), op, ": grads[", i,
                      "] must be a contiguous tensor of shape ", p.sizes(), " on ", p.device(), ", got ", g.sizes());
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] dtype ", g.scalar_type(),
                     " does not match the param's ", p.scalar_type());
    const std::optional<at::Tensor> sel = selectors.get(i);
    int64_t state_numel = p.numel();
    switch (selection_of(sel)) {
      case Selection::All:
        break;
      case Selection::Mask:
        TORCH_CHECK_VALUE(sel->sizes() == p.sizes() && sel->is_contiguous() && sel->device() == p.device(), op,
                          ": masks[", i, "] must be a contiguous bool tensor of the param's shape ", p.sizes(),
                          " on ", p.device(), ", got ", sel->sizes());
        break;
      case Selection::Indices:
        TORCH_CHECK_TYPE(sel->scalar_type() == at::kInt || sel->scalar_type() == at::kLong, op, ": masks[", i,
                         "] must be a bool mask or int32/int64 indices, got ", sel->scalar_type());
        TORCH_CHECK_VALUE(sel->dim() == 1 && sel->is_contiguous() && sel->device() == p.device(), op,
                          ": indices[", i, "] must be a contiguous 1-D tensor on ", p.device());
        TORCH_CHECK_VALUE(sel->numel() <= p.numel(), op, ": indices[", i, "] has ", sel->numel(),
                          " entries, more than the param's ", p.numel());
        check_indices(op, *sel, p.numel());
        state_numel = sel->numel();
        break;
    }
    for (const auto& s : states) {
      const at::Tensor& t = s.second[i];
      TORCH_CHECK_VALUE(t.numel() == state_numel && t.is_contiguous() && t.device() == p.device(), op, ": ",
                        s.first, "[", i, "] must be contiguous with ", state_numel, " entries on ", p.device(),
                        ", got ", t.numel());
      TORCH_CHECK_TYPE(t.scalar_type() == p.scalar_type(), op, ": ", s.first, "[", i, "] dtype ", t.scalar_type(),
                       " does not match the param's ", p.scalar_type());
    }
    const at::Tensor& st = steps[i];
    const bool shared = st.numel() == 1 && st.scalar_type() == at::kFloat;
    const bool own = st.numel() == state_numel && st.scalar_type() == at::kInt && st.is_contiguous();
    TORCH_CHECK_VALUE((shared || own) && st.device() == p.device(), op, ": steps[", i,
                      "] must be a one-element float32 tensor or an int32 tensor with ", state_numel,
                      " entries on ", p.device(), ", got ", st.scalar_type(), " with ", st.numel());
    if (inits.size()) {
      const std::optional<at::Tensor> init = inits.get(i);
      TORCH_CHECK_VALUE(init.has_value() && init->defined(), op, ": inits[", i, "] is missing");
      TORCH_CHECK_VALUE(init->numel() == state_numel && init->is_contiguous() && init->device() == p.device(), op,
                        ": inits[", i, "] must be contiguous with ", state_numel, " entries on ", p.device());
      TORCH_CHECK_TYPE(init->scalar_type() == p.scalar_type(), op, ": inits[", i, "] dtype ", init->scalar_type(),
                       " does not match the param's ", p.scalar_type());
    }
  }
}

// grad_out [T, O], input [T, I], masks [L, O, I] bool, order int64 token positions, offsets [L + 1]
// int64: language l owns order[offsets[l]:offsets[l + 1]].
inline void check_multi_mask_weight_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& input,
                                         const at::Tensor& masks, const at::Tensor& order,
                                         const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && input.dim() == 2 && grad_out.size(0) == input.size(0), op,
                    ": grad_out [T, O] and input [T, I] must be 2-D with the same T, got ", grad_out.sizes(),
                    " and ", input.sizes());
  TORCH_CHECK_TYPE(is_value_dtype(input.scalar_type()) && grad_out.scalar_type() == input.scalar_type(), op,
                   ": grad_out and input must share one floating dtype, got ", grad_out.scalar_type(), " and ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(masks.scalar_type() == at::kBool, op, ": masks must be bool, got ", masks.scalar_type());
  TORCH_CHECK_VALUE(masks.dim() == 3 && masks.size(1) == grad_out.size(1) && masks.size(2) == input.size(1), op,
                    ": masks must have shape [L, ", grad_out.size(1), ", ", input.size(1), "], got ", masks.sizes());
  TORCH_CHECK_TYPE(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong, op,
                   ": order and offsets must be int64");
  TORCH_CHECK_VALUE(order.dim() == 1 && offsets.dim() == 1 && offsets.numel() == masks.size(0) + 1, op,
                    ": order must be 1-D and offsets must have L + 1 = ", masks.size(0) + 1, " entries, got ",
                    offsets.sizes());
  for (const at::Tensor* t : {&input, &masks, &order, &offsets})
    TORCH_CHECK_VALUE(t->device() == grad_out.device(), op, ": every tensor must be on ", grad_out.device());
  // Read before any kernel runs (a host sync on GPU), so that bad routing never reads out of bounds.
  const at::Tensor off_cpu = offsets.to(at::kCPU).contiguous();
  const int64_t* off = off_cpu.data_ptr<int64_t>();
  for (int64_t l = 0; l < masks.size(0); ++l)
    TORCH_CHECK_VALUE(off[0] >= 0 && off[l] <= off[l + 1] && off[l + 1] <= order.numel(), op,
                      ": offsets must be non-decreasing inside [0, ", order.numel(), "]");
  if (order.numel()) {
    const auto lo = order.min().item<int64_t>(), hi = order.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < input.size(0), op, ": order holds token ", lo < 0 ? lo : hi,
                      ", outside [0, ", input.size(0), ")");
  }
}

// Shape, dtype and order checks of the lists merge_deltas reads (CPU and CUDA: float indices are refused).
inline void check_merge(const char* op, at::TensorList indices, at::TensorList values, at::ArrayRef<double> weights,
                 int64_t numel) {
  const int64_t n = static_cast<int64_t>(indices.size());
  TORCH_CHECK_VALUE(n >= 1, op, ": needs at least one delta");
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == n && static_cast<int64_t>(weights.size()) == n, op,
                    ": indices, values and weights must have one entry each, got ", n, ", ", values.size(), ", ",
                    weights.size());
  TORCH_CHECK_VALUE(numel >= 0, op, ": numel must be >= 0, got ", numel);
  for (int64_t e = 0; e < n; ++e) {
    const std::string where = std::string(op) + " delta " + std::to_string(e);
    TORCH_CHECK_VALUE(indices[e].dim() == 1 && values[e].dim() == 1 && indices[e].numel() == values[e].numel(), where,
                      ": indices and values must be 1-D of one length, got ", indices[e].sizes(), " and ",
                      values[e].sizes());
    TORCH_CHECK_TYPE(indices[e].scalar_type() == at::kInt || indices[e].scalar_type() == at::kLong, where,
                     ": indices must be int32 or int64, got ", indices[e].scalar_type());
    TORCH_CHECK_TYPE(indices[e].scalar_type() == indices[0].scalar_type(), where, ": index dtype ",
                     indices[e].scalar_type(), " differs from delta 0's ", indices[0].scalar_type());
    TORCH_CHECK_TYPE(is_value_dtype(values[e].scalar_type()) && values[e].scalar_type() == values[0].scalar_type(),
                     where, ": values must share one floating dtype, got ", values[e].scalar_type(), " and ",
                     values[0].scalar_type());
    TORCH_CHECK_VALUE(indices[e].device() == indices[0].device() && values[e].device() == indices[0].device(), where,
                      ": all tensors must be on one device");
    check_indices(where.c_str(), indices[e], numel);
  }
}

inline void check_targets(const char* op, const at::Tensor& targets, int64_t V) {
  if (targets.numel() == 0) return;
  const auto lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < V, op, ": targets must lie in [0, ", V, "), got min ", lo, ", max ", hi);
}

// spmm_ writes `out` through a raw pointer (contiguous); its values are one per index, in x's dtype.
inline void check_spmm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
                       const char* op = "spmm_") {
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == indices.numel(), op, ": values must be 1-D with ",
                    indices.numel(), " entries like indices, got ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), op, ": values dtype ", values.scalar_type(),
                   " does not match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(values.device() == x.device(), op, ": values must be on ", x.device());
}

// topk_masks: tensors of one floating dtype on one device, 0 <= k <= their total size. Returns the total.
inline int64_t check_topk(const char* op, at::TensorList tensors, int64_t k) {
  int64_t total = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    TORCH_CHECK_TYPE(is_value_dtype(tensors[t].scalar_type()) && tensors[t].scalar_type() == tensors[0].scalar_type(),
                     op, ": tensors must share one floating dtype; tensors[", t, "] is ", tensors[t].scalar_type());
    TORCH_CHECK_VALUE(tensors[t].device() == tensors[0].device(), op, ": tensors must be on one device; tensors[", t,
                      "] is on ", tensors[t].device());
    total += tensors[t].numel();
  }
  TORCH_CHECK_VALUE(k >= 0 && k <= total, op, ": k = ", k, " is outside [0, ", total, "] (the total element count)");
  return total;
}

// The ensemble backward ops read grad, the saved output (log-probs [T, V] or nll [T]) and the
// logsumexp ([E, T] in prob space, [1, T] in logit space, in the accumulation dtype) at the
// logits' positions: they must have exactly those shapes and dtypes. Log-probs and their grad are
// in the logits' dtype; nll and its grad in the accumulation dtype, since the prob-space posterior
// exp(lw + z[y] − lse + nll) is as precise as nll is.
inline void check_ensemble_saved(const char* op, const at::Tensor& logits, const at::Tensor& grad,
                                 const at::Tensor& result, const at::Tensor& lse, bool prob_space, bool nll) {
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  const std::vector<int64_t> want = nll ? std::vector<int64_t>{T} : std::vector<int64_t>{T, V};
  const at::ScalarType wide = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::ScalarType saved = nll ? wide : logits.scalar_type();
  for (const at::Tensor* x : {&grad, &result}) {
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(want), op, ": grad and the saved output must have shape ",
                      at::IntArrayRef(want), ", got ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == saved, op, ": grad and the saved output must be ", saved, ", got ",
                     x->scalar_type());
    TORCH_CHECK_VALUE(x->device() == logits.device(), op, ": every tensor must be on ", logits.device());
  }
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == (prob_space ? E : 1) && lse.size(1) == T, op,
                    ": lse must have shape [", prob_space ? E : 1, ", ", T, "], got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == wide, op, ": lse must be ", wide, ", got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == logits.device(), op, ": lse must be on ", logits.device());
}

}  // namespace xlsparse

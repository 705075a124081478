// Multi-mask gated matmul math, shared by csrc/cpu/matmul.cpp and csrc/cuda/matmul.cu.
//
// A delta Δ of a weight [O, I] is (indices [K], values [K]): entry n sits at row
// indices[n] / I and column indices[n] % I. Two kernels serve every linear layer:
//   sddmm:  dval[n] = Σ_t s_t · a[t, r_n] · b[t, c_n]        (a = dY [T, O], b = X [T, I])
//   spmm_:  out[t, r_n] += s_t · val[n] · x[t, c_n]           (out += s ⊙ X Δᵀ)
//           out[t, c_n] += s_t · val[n] · x[t, r_n]           (transpose: out += s ⊙ X Δ)
// over a token selection: token_index[token_bounds[0]:token_bounds[1]] (all tokens when absent),
// each token scaled by token_scale[t] (1 when absent).
//
// Expert-ensemble mixing over E experts' logits z_e [T, V] with log-weights lw [T, E]:
//   prob space:  out[t, v] = log Σ_e exp(lw[t, e] + z_e[t, v] − lse_e[t])
//   logit space: out[t, v] = log_softmax(Σ_e exp(lw[t, e]) · z_e[t, ·])[v]
#pragma once

#include <ATen/ATen.h>

#include "xlsparse/common.h"

namespace xlsparse {

// log(exp(a) + exp(b)), safe when either side is −inf.
template <typename T>
XLS_HD T log_add_exp(T a, T b) {
  const T hi = a > b ? a : b;
  const T lo = a > b ? b : a;
  if (lo == -INFINITY) return hi;
  return hi + ::log1p(::exp(lo - hi));
}

// The dtype acc_t<T> of a tensor dtype: double stays double, the rest accumulate in float.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// --- argument checks, shared by the CPU and CUDA entry points (host only) ---

// a [T, A] and b [T, B] share dtype, device and T; indices address a [A, B] (or [B, A]) delta.
inline void check_token_matmul(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                               const c10::optional<at::Tensor>& token_index,
                               const c10::optional<at::Tensor>& token_bounds,
                               const c10::optional<at::Tensor>& token_scale) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": expected 2-D token matrices, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), op, ": token counts differ: ", a.size(0), " and ", b.size(0));
  TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()), op, ": expected floating point, got ", a.scalar_type());
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
    TORCH_CHECK_TYPE(at::isFloatingType(ts.scalar_type()), op, ": token_scale must be floating point");
    TORCH_CHECK_VALUE(ts.dim() == 1 && ts.size(0) == a.size(0) && ts.device() == a.device(), op,
                      ": token_scale must have shape [", a.size(0), "] on ", a.device(), ", got ", ts.sizes());
  }
}

// Reads the selection on the device (a sync): bounds inside token_index, ids inside [0, T).
inline void check_token_values(const char* op, int64_t num_tokens, const c10::optional<at::Tensor>& token_index,
                               const c10::optional<at::Tensor>& token_bounds) {
  if (!token_index.has_value()) return;
  int64_t lo = 0, hi = token_index->numel();
  if (token_bounds.has_value()) {
    const auto b = token_bounds->cpu();
    lo = b.data_ptr<int64_t>()[0];
    hi = b.data_ptr<int64_t>()[1];
    TORCH_CHECK_INDEX(0 <= lo && lo <= hi && hi <= token_index->numel(), op, ": token_bounds [", lo, ", ", hi,
                      ") do not fit token_index of ", token_index->numel(), " entries");
  }
  if (hi > lo) {
    const auto sel = token_index->slice(0, lo, hi);
    const auto mn = sel.min().item<int64_t>(), mx = sel.max().item<int64_t>();
    TORCH_CHECK_INDEX(mn >= 0 && mx < num_tokens, op, ": token_index holds ids outside [0, ", num_tokens, ")");
  }
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
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK_TYPE(log_weights.scalar_type() == logits.scalar_type(), op, ": log_weights dtype ",
                   log_weights.scalar_type(), " does not match logits dtype ", logits.scalar_type());
  TORCH_CHECK_VALUE(log_weights.device() == logits.device(), op, ": logits and log_weights must be on one device");
  if (targets != nullptr) {
    TORCH_CHECK_TYPE(targets->scalar_type() == at::kLong, op, ": targets must be int64, got ", targets->scalar_type());
    TORCH_CHECK_VALUE(targets->dim() == 1 && targets->size(0) == logits.size(1), op, ": targets must be [",
                      logits.size(1), "], got ", targets->sizes());
    TORCH_CHECK_VALUE(targets->device() == logits.device(), op, ": targets must be on ", logits.device());
  }
}

}  // namespace xlsparse

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

// The prob-space log-mixture of one class: log Σ_e exp(x(e)) over the E terms
// x(e) = lw_e + z_e[v] − lse_e, shifted by their largest; −inf (log 0, not NaN) when every term is
// −inf, a class every expert bans. The forward's per-class value (CUDA; the CPU kernel's exact
// path), and what the backward recomputes in the accumulation dtype instead of reading the saved
// out, which is rounded to the logits' dtype (bf16 near −10: a 0.0625 grid, ~1% off in the posterior).
template <typename acc, typename Term>
XLS_HD acc log_mixture(int64_t E, const Term& x) {
  acc hi = -INFINITY;
  for (int64_t e = 0; e < E; ++e) {
    const acc xe = x(e);
    hi = xe > hi ? xe : hi;
  }
  if (hi == -INFINITY) return hi;
  acc sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(x(e) - hi);
  return hi + std::log(sum);
}

// The posterior of expert e for class v is exp(lw_e + z_e[v] − lse_e − out[v]). A class every
// expert bans has z = out = −inf, and −inf − (−inf) is NaN; its posterior is 0, which an out of
// +inf gives. Likewise a target every expert bans (nll = +inf) enters as −inf.
template <typename T>
XLS_HD T out_for_posterior(T out) { return out == -INFINITY ? T(INFINITY) : out; }
template <typename T>
XLS_HD T nll_for_posterior(T nll) { return nll == INFINITY ? T(-INFINITY) : nll; }

// d · z with 0 · (±inf) = 0: a class that an expert bans (z = −inf, so the mixed logit is −inf
// too) adds nothing to the gradient of its log-weight where the mixed logits' gradient d is 0,
// as in the reference (`_times`).
template <typename T>
XLS_HD T times_nonzero(T d, T z) { return d == T(0) ? T(0) : d * z; }

// The dtype acc_t<T> of a tensor dtype: double stays double, the rest accumulate in float.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// --- argument checks, shared by the CPU and CUDA entry points (host only) ---

}  // namespace xlsparse

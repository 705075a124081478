// Masked-gradient update math (AdamW, SGD), shared by csrc/cpu/optim.cpp and csrc/cuda/optim.cu,
// and the argument checks of the optim ops.
//
// The update functions are templates over the value type T: the accumulation scalar (float, double)
// on both backends, and at::vec::Vectorized<float> in the CPU kernel, which specialises ElemOps.
#pragma once

#include <cmath>

#include "xlsparse/checks.h"
#include "xlsparse/common.h"

namespace xlsparse {

// The elementwise functions the formulas need beyond + - * /.
template <typename T>
struct ElemOps {
  static XLS_HD T sqrt(T x) { return std::sqrt(x); }
  // NaN-propagating like torch.maximum (amsgrad's running max).
  static XLS_HD T max(T a, T b) { return (a > b || a != a) ? a : b; }
  static XLS_HD T sign(T x) { return static_cast<T>((x > T(0)) - (x < T(0))); }
};

// Per-step AdamW constants, computed once per tensor (shared step) or per entry (own step count).
template <typename A>
struct AdamwCoef {
  A beta1, beta2, eps;
  A one_minus_beta1, one_minus_beta2;
  A decay;      // 1 - lr * weight_decay (decoupled weight decay)
  A step_size;  // lr / (1 - beta1^t)
  A bias2_sqrt; // sqrt(1 - beta2^t)
  A l1;         // l1_to_init: the gradient of l1 * |p - p0|
  A grad_scale; // AMP: grads arrive multiplied by this; 1 without AMP
};

// t is the step count after this step (1 on the first step), as in torch.optim.AdamW.
template <typename A>
XLS_HD AdamwCoef<A> adamw_coef(double lr, double beta1, double beta2, double eps, double weight_decay,
                               double l1, A t, A grad_scale) {
  AdamwCoef<A> c;
  c.beta1 = static_cast<A>(beta1);
  c.beta2 = static_cast<A>(beta2);
  c.eps = static_cast<A>(eps);
  c.one_minus_beta1 = static_cast<A>(1 - beta1);
  c.one_minus_beta2 = static_cast<A>(1 - beta2);
  c.decay = static_cast<A>(1 - lr * weight_decay);
  c.step_size = static_cast<A>(lr) / (A(1) - static_cast<A>(pow(beta1, static_cast<double>(t))));
  c.bias2_sqrt = std::sqrt(A(1) - static_cast<A>(pow(beta2, static_cast<double>(t))));
  c.l1 = static_cast<A>(l1);
  c.grad_scale = grad_scale;
  return c;
}

// One AdamW step of one entry (or one vector of entries): torch.optim.AdamW's formulas.
// `init` is read only when use_l1; `vmax` only when amsgrad.
template <typename T, typename A>
XLS_HD void adamw_update(T& p, T g, T& m, T& v, T& vmax, T init, const AdamwCoef<A>& c, bool amsgrad,
                         bool use_l1) {
  using E = ElemOps<T>;
  if (c.grad_scale != A(1)) g = g / T(c.grad_scale);  // AMP only: a division costs on CPU
  if (use_l1) g = g + T(c.l1) * E::sign(p - init);  // LT-SFT's L1 pull toward the initial value
  p = p * T(c.decay);
  m = m + T(c.one_minus_beta1) * (g - m);  // exp_avg.lerp_(grad, 1 - beta1)
  v = v * T(c.beta2) + T(c.one_minus_beta2) * g * g;
  T second = v;
  if (amsgrad) {
    vmax = E::max(vmax, v);
    second = vmax;
  }
  const T denom = E::sqrt(second) / T(c.bias2_sqrt) + T(c.eps);
  p = p - T(c.step_size) * m / denom;
}

template <typename A>
struct SgdCoef {
  A lr, momentum, one_minus_dampening, weight_decay, grad_scale;
};

// One SGD step, torch.optim.SGD's formulas. `first` marks the entry's first step with momentum,
// where the buffer starts as the gradient itself.
template <typename T, typename A>
XLS_HD void sgd_update(T& p, T g, T& buf, bool first, const SgdCoef<A>& c, bool use_momentum, bool nesterov) {
  if (c.grad_scale != A(1)) g = g / T(c.grad_scale);
  // Skipped when zero, as torch does: 0 * inf would turn an inf parameter into NaN.
  if (c.weight_decay != A(0)) g = g + T(c.weight_decay) * p;
  if (use_momentum) {
    buf = first ? g : buf * T(c.momentum) + T(c.one_minus_dampening) * g;
    g = nesterov ? g + T(c.momentum) * buf : buf;
  }
  p = p - T(c.lr) * g;
}

#if !defined(__CUDACC__)
// The float32 vector loops of the CPU kernels (csrc/cpu/optim_vec.cpp, compiled for AVX2+FMA on
// x86-64). Each runs entries [begin, end) of one parameter kV at a time and returns where the
// scalar tail starts; entries whose mask byte is false are never changed.
namespace vec_loops {

struct FloatJob {
  float* p;
  const float* g;
  float* s0;  // exp_avg / momentum buffer
  float* s1;  // exp_avg_sq
  float* s2;  // max_exp_avg_sq (amsgrad)
  const float* init;  // l1_to_init anchors, or null
  const bool* mask;   // null: every entry
};

bool usable();  // the CPU has the instructions the loops were compiled for
int64_t adamw(const FloatJob& q, int64_t begin, int64_t end, const AdamwCoef<float>& c, bool amsgrad);
// Compact selection (int32 indices): gathers p and g, streams the K-sized state.
int64_t adamw_compact(const FloatJob& q, const int32_t* idx, int64_t begin, int64_t end, const AdamwCoef<float>& c,
                      bool amsgrad);
// dst[i] += src[i] where mask[i], for i < the returned count (exact: src outside the mask is never added).
int64_t masked_add(float* dst, const float* src, const bool* mask, int64_t n);
int64_t sgd(const FloatJob& q, int64_t begin, int64_t end, const SgdCoef<float>& c, bool first, bool momentum,
            bool nesterov);

}  // namespace vec_loops
#endif

// --- checks shared by the CPU and CUDA entry points (host only) ---

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
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op, ": params[", i, "] must be floating point, got ",
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
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()) && grad_out.scalar_type() == input.scalar_type(), op,
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

}  // namespace xlsparse

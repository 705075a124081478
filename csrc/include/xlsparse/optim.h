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
  // 1 - beta^t in double, rounded once: beta2^t rounded to float first and then subtracted from 1
  // cancels (beta2 = 0.999 at t = 1 leaves 1e-3 with the rounding error of 1: 7e-6 relative).
  c.step_size = static_cast<A>(lr / (1 - pow(beta1, static_cast<double>(t))));
  c.bias2_sqrt = static_cast<A>(std::sqrt(1 - pow(beta2, static_cast<double>(t))));
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

}  // namespace xlsparse

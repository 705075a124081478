// The row primitives of the matmul CPU kernels (the MatmulKernels table of xlsparse/cpu_kernels.h)
// in at::vec, compiled once per CPU capability; exp and log are ATen's (Sleef, 1 ulp).
//
// Each loop runs whole vectors; the last one is partial: loads past n read zeros (or `fill` where
// a zero would change the result), and stores write the n % size lanes only.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

#include "xlsparse/cpu_kernels.h"

namespace xlsparse {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Calls f(i, count) for the vectors of [0, n): count = Vec<T>::size() but in the last one.
template <typename T, typename F>
inline void each_vec(int64_t n, const F& f) {
  constexpr int64_t kV = Vec<T>::size();
  for (int64_t i = 0; i < n; i += kV) f(i, std::min(kV, n - i));
}

// x[0:count], with `fill` in the lanes past count.
template <typename T>
inline Vec<T> load(const T* x, int64_t count, T fill) {
  return Vec<T>::set(Vec<T>(fill), Vec<T>::loadu(x, count), count);
}

template <typename T>
inline T add_all(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  Vec<T> s(0);
  each_vec<T>(n, [&](int64_t i, int64_t c) { s = at::vec::fmadd(Vec<T>::loadu(a + i, c), Vec<T>::loadu(b + i, c), s); });
  return add_all(s);
}

template <typename T>
void dot4(const T* a, const T* b0, const T* b1, const T* b2, const T* b3, int64_t n, T* s) {
  Vec<T> s0(0), s1(0), s2(0), s3(0);
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    const Vec<T> ai = Vec<T>::loadu(a + i, c);
    s0 = at::vec::fmadd(ai, Vec<T>::loadu(b0 + i, c), s0);
    s1 = at::vec::fmadd(ai, Vec<T>::loadu(b1 + i, c), s1);
    s2 = at::vec::fmadd(ai, Vec<T>::loadu(b2 + i, c), s2);
    s3 = at::vec::fmadd(ai, Vec<T>::loadu(b3 + i, c), s3);
  });
  s[0] += add_all(s0);
  s[1] += add_all(s1);
  s[2] += add_all(s2);
  s[3] += add_all(s3);
}

template <typename T>
void axpy(T* y, T alpha, const T* x, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    at::vec::fmadd(Vec<T>(alpha), Vec<T>::loadu(x + i, c), Vec<T>::loadu(y + i, c)).store(y + i, c);
  });
}

template <typename T>
void axpy4(T* y, const T* alpha, const T* x0, const T* x1, const T* x2, const T* x3, int64_t n) {
  const Vec<T> a0(alpha[0]), a1(alpha[1]), a2(alpha[2]), a3(alpha[3]);
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    Vec<T> acc = Vec<T>::loadu(y + i, c);
    acc = at::vec::fmadd(a0, Vec<T>::loadu(x0 + i, c), acc);
    acc = at::vec::fmadd(a1, Vec<T>::loadu(x1 + i, c), acc);
    acc = at::vec::fmadd(a2, Vec<T>::loadu(x2 + i, c), acc);
    at::vec::fmadd(a3, Vec<T>::loadu(x3 + i, c), acc).store(y + i, c);
  });
}

template <typename T>
T sum(const T* x, int64_t n) {
  Vec<T> s(0);
  each_vec<T>(n, [&](int64_t i, int64_t c) { s = s + Vec<T>::loadu(x + i, c); });
  return add_all(s);
}

template <typename T>
T row_max(const T* z, int64_t n) {
  constexpr T lowest = -std::numeric_limits<T>::infinity();
  Vec<T> m(lowest);
  each_vec<T>(n, [&](int64_t i, int64_t c) { m = at::vec::maximum(m, load(z + i, c, lowest)); });
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, m);
}

template <typename T>
T exp_store(T* p, const T* z, T m, int64_t n) {
  Vec<T> s(0);
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    const Vec<T> e = (load(z + i, c, -std::numeric_limits<T>::infinity()) - Vec<T>(m)).exp();  // exp(−inf) = 0
    e.store(p + i, c);
    s = s + e;
  });
  return add_all(s);
}

template <typename T>
T row_lse(const T* z, int64_t n) {
  const T m = row_max(z, n);
  if (m == -std::numeric_limits<T>::infinity()) return m;
  Vec<T> s(0);
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    s = s + (load(z + i, c, -std::numeric_limits<T>::infinity()) - Vec<T>(m)).exp();
  });
  return m + std::log(add_all(s));
}

template <typename T>
void vlog(T* out, const T* x, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) { Vec<T>::loadu(x + i, c).log().store(out + i, c); });
}

template <typename T>
void add_scalar(T* out, const T* x, T c0, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) { (Vec<T>::loadu(x + i, c) + Vec<T>(c0)).store(out + i, c); });
}

template <typename T>
T dot_exp(const T* g, const T* z, T a, T b, const T* out, int64_t n) {
  Vec<T> s(0);
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    const Vec<T> e = (((Vec<T>::loadu(z + i, c) + Vec<T>(a)) + Vec<T>(b)) - Vec<T>::loadu(out + i, c)).exp();
    s = s + Vec<T>::set(Vec<T>(0), Vec<T>::loadu(g + i, c) * e, c);  // 0 · inf past n would be NaN
  });
  return add_all(s);
}

template <typename T>
void prob_grad(T* dz, const T* g, const T* z, T lse, T lw, const T* out, T S, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    const Vec<T> logp = Vec<T>::loadu(z + i, c) - Vec<T>(lse);
    const Vec<T> post = ((logp + Vec<T>(lw)) - Vec<T>::loadu(out + i, c)).exp();
    (Vec<T>::loadu(g + i, c) * post - logp.exp() * Vec<T>(S)).store(dz + i, c);
  });
}

template <typename T>
void scaled_softmax(T* out, const T* z, T lse, T a, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    (Vec<T>(a) * (Vec<T>::loadu(z + i, c) - Vec<T>(lse)).exp()).store(out + i, c);
  });
}

template <typename T>
void softmax_grad(T* d, const T* g, const T* logp, T G, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    (Vec<T>::loadu(g + i, c) - Vec<T>::loadu(logp + i, c).exp() * Vec<T>(G)).store(d + i, c);
  });
}

template <typename T>
constexpr RowKernels<T> row_kernels() {
  return {&dot<T>,       &dot4<T>,      &axpy<T>,       &axpy4<T>,       &sum<T>,
          &row_max<T>,   &row_lse<T>,   &exp_store<T>,  &vlog<T>,        &add_scalar<T>,
          &dot_exp<T>,   &prob_grad<T>, &scaled_softmax<T>, &softmax_grad<T>};
}

}  // namespace

extern const MatmulKernels matmul_table = {row_kernels<float>(), row_kernels<double>()};

}  // namespace CPU_CAPABILITY
}  // namespace xlsparse

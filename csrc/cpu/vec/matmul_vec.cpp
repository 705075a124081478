// The row primitives of the matmul CPU kernels (the MatmulKernels table of xlsparse/cpu_kernels.h)
// in at::vec, compiled once per CPU capability; exp and log are ATen's (Sleef, 1 ulp).
//
// Each loop runs whole vectors; the last one is partial: loads past n read zeros (or `fill` where
// a zero would change the result), and stores write the n % size lanes only.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstring>
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

// s[q] += the lane sum of acc[q], q < R <= 8, all through one tree of horizontal adds (6 hadds
// for up to 8 vectors) instead of R separate reductions: a 256-token chunk's dot is only 16 AVX-512
// vectors long, so the reductions were a large share of SDDMM's dot time (the tree: 1.06x the
// whole op at 1%). Every R takes the same tree, zeros in the unused slots, so an entry's sum has
// the same bits whichever group it falls in: results stay identical across thread counts.
template <int R>
inline void add_sums(const Vec<float>* acc, float* s) {
  if constexpr (R > 8) {  // eight at a time: each sum's bits stay those of the one tree
    add_sums<8>(acc, s);
    return add_sums<R - 8>(acc + 8, s + 8);
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  __m256 y[8];
  for (int q = 0; q < 8; ++q) {
    if (q >= R) {
      y[q] = _mm256_setzero_ps();
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 v = acc[q];
      y[q] = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
#else
      y[q] = acc[q];
#endif
    }
  }
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(y[0], y[1]), _mm256_hadd_ps(y[2], y[3]));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(y[4], y[5]), _mm256_hadd_ps(y[6], y[7]));
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
  alignas(32) float out[8];
  _mm256_store_ps(out, sums);
  for (int q = 0; q < R; ++q) s[q] += out[q];
#else
  for (int q = 0; q < R; ++q) s[q] += add_all(acc[q]);
#endif
}

// {a0 · b[q][0:V]} for q in Q (zeros when not `load`).
template <typename T, int... Q>
inline std::array<Vec<T>, sizeof...(Q)> first_products(const Vec<T>& a0, const T* const* b,
                                                       std::integer_sequence<int, Q...>, bool load = true) {
  return {{(load ? a0 * Vec<T>::loadu(b[Q]) : Vec<T>(0))...}};
}

// s[j] += Σ_i a[i] b[j][i] for j < R, with R accumulators in registers.
template <typename T, int R>
void dots_fixed(const T* a, const T* const* b, int64_t n, T* s) {
  constexpr int64_t kV = Vec<T>::size();
  const int64_t full = n / kV * kV;
  // The first vector's products start the sums (the bits of an fmadd onto zeros), built in place:
  // a default-constructed array was zeroed by a `rep stos` (6% of the 8-row kernel's samples);
  // SDDMM at 1%, T = 2048, went 4-9% faster (1 thread, 12 alternating processes, both shapes).
  std::array<Vec<T>, R> acc = full ? first_products<T>(Vec<T>::loadu(a), b, std::make_integer_sequence<int, R>())
                                   : first_products<T>(Vec<T>(0), b, std::make_integer_sequence<int, R>(), false);
  for (int64_t i = kV; i < full; i += kV) {
    const Vec<T> ai = Vec<T>::loadu(a + i);
    for (int q = 0; q < R; ++q) acc[q] = at::vec::fmadd(ai, Vec<T>::loadu(b[q] + i), acc[q]);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (full == n) return add_sums<R>(acc.data(), s);
  }
  for (int q = 0; q < R; ++q) s[q] += add_all(acc[q]) + (full < n ? dot(a + full, b[q] + full, n - full) : T(0));
}

// s[j] += Σ_i a[i] b[j][i] for j < m. Up to twelve rows share each load of a: SDDMM is bound by
// loads, and 12 accumulators plus a fit the 16 vector registers of AVX2 (b's loads are the FMAs'
// memory operands). A row of 9-12 entries (4096 x 1024 at 1% has 10 on average) takes one kernel,
// not eight plus a small one whose entries cost about twice as much each; longer rows go eight
// at a time first. One fixed-size kernel per group, not single dot products (those took 40% of
// SDDMM's dot time).
template <typename T>
void dots(const T* a, const T* const* b, int64_t m, int64_t n, T* s) {
  for (; m > 12; m -= 8, b += 8, s += 8) dots_fixed<T, 8>(a, b, n, s);
  switch (m) {
    case 12: return dots_fixed<T, 12>(a, b, n, s);
    case 11: return dots_fixed<T, 11>(a, b, n, s);
    case 10: return dots_fixed<T, 10>(a, b, n, s);
    case 9: return dots_fixed<T, 9>(a, b, n, s);
    case 8: return dots_fixed<T, 8>(a, b, n, s);
    case 7: return dots_fixed<T, 7>(a, b, n, s);
    case 6: return dots_fixed<T, 6>(a, b, n, s);
    case 5: return dots_fixed<T, 5>(a, b, n, s);
    case 4: return dots_fixed<T, 4>(a, b, n, s);
    case 3: return dots_fixed<T, 3>(a, b, n, s);
    case 2: return dots_fixed<T, 2>(a, b, n, s);
    case 1: return dots_fixed<T, 1>(a, b, n, s);
    default: return;
  }
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

// dst[c·stride + j] = scale[j] · rows[j][c] for j < m, c < cols (scale null: 1), one vector-wide
// tile of token rows at a time, transposed in registers. dst has round_up(cols) rows and its columns
// j in [m, size) are written with zeros: the caller pads both to whole vectors. S is T, or uint16_t
// for the bits of bfloat16 rows (converted on load, a loop the compiler vectorizes). `next_rows`:
// the next call transposes the kV rows that follow these at the same spacing.
template <typename T, typename S>
void transpose_rows(const S* const* rows, const T* scale, int64_t m, int64_t cols, T* dst, int64_t stride,
                    bool next_rows) {
  constexpr int64_t kV = Vec<T>::size();
  // The m rows are m streams, too many for the hardware prefetcher: ask for the line 512 bytes
  // ahead in each.
  constexpr int64_t kAhead = 512 / sizeof(S);
  alignas(64) T tile[kV * kV];
  int64_t done = 0;  // columns already transposed
  if constexpr (std::is_same_v<S, T>) {
    // A full tile of evenly spaced rows (consecutive tokens), unscaled: transposed straight from
    // the source in registers. Going through `tile` with a pointer per row took 1.3x as long for
    // SDDMM at 1%, T = 2048, 4096 x 1024.
    const int64_t ld = m == kV ? rows[1] - rows[0] : 0;
    bool even = m == kV && !scale;
    for (int64_t j = 2; even && j < m; ++j) even = rows[j] - rows[j - 1] == ld;
    for (; even && done + kV <= cols; done += kV) {
      // SDDMM reads a's token rows in 1 KiB pieces 16 KiB apart, 2.3-3x slower than a contiguous
      // read: ask for the next call's line of each row, one tile ahead (into L2). 3-9% off SDDMM at
      // 1%, T = 2048, 4096 x 1024 and 1024 x 4096 (2 threads, alternating calls, min and median; an
      // A/B on a noisy host, not a benchmarks/ number).
      if (next_rows && (done * sizeof(S)) % 64 == 0) {
        for (int64_t j = 0; j < kV; ++j) __builtin_prefetch(rows[0] + (kV + j) * ld + done, 0, 1);
      }
      at::vec::transpose_mxn<T, kV, kV>(rows[0] + done, ld, dst + done * stride, stride);
    }
  }
  for (int64_t c0 = done; c0 < cols; c0 += kV) {
    const int64_t cc = std::min(kV, cols - c0);
    for (int64_t j = 0; j < kV; ++j) {
      Vec<T> row(0);
      if (j < m) {
        __builtin_prefetch(rows[j] + c0 + kAhead);
        if constexpr (std::is_same_v<S, T>) {
          row = Vec<T>::loadu(rows[j] + c0, cc);
        } else {
          alignas(64) T wide[kV] = {};
          for (int64_t c = 0; c < cc; ++c) wide[c] = static_cast<T>(bf16_to_float(rows[j][c0 + c]));
          row = Vec<T>::loadu(wide);
        }
        if (scale) row = row * Vec<T>(scale[j]);
      }
      row.store(tile + j * kV);
    }
    at::vec::transpose_mxn<T, kV, kV>(tile, kV, dst + c0 * stride, stride);
  }
}

// y += alpha · s ⊙ x (scale s null: 1).
template <typename T>
void axpy(T* y, T alpha, const T* x, const T* scale, int64_t n) {
  each_vec<T>(n, [&](int64_t i, int64_t c) {
    const Vec<T> a = scale ? Vec<T>(alpha) * Vec<T>::loadu(scale + i, c) : Vec<T>(alpha);
    at::vec::fmadd(a, Vec<T>::loadu(x + i, c), Vec<T>::loadu(y + i, c)).store(y + i, c);
  });
}

// y += s ⊙ Σ_j alpha[j] x_j (scale s null: 1). Scaled, the four products are summed first and
// multiplied by s once: one more load and multiply per vector, not a pass of its own.
template <typename T>
void axpy4(T* y, const T* alpha, const T* x0, const T* x1, const T* x2, const T* x3, const T* scale, int64_t n) {
  const Vec<T> a0(alpha[0]), a1(alpha[1]), a2(alpha[2]), a3(alpha[3]);
  if (scale) {
    each_vec<T>(n, [&](int64_t i, int64_t c) {
      Vec<T> acc = a0 * Vec<T>::loadu(x0 + i, c);
      acc = at::vec::fmadd(a1, Vec<T>::loadu(x1 + i, c), acc);
      acc = at::vec::fmadd(a2, Vec<T>::loadu(x2 + i, c), acc);
      acc = at::vec::fmadd(a3, Vec<T>::loadu(x3 + i, c), acc);
      at::vec::fmadd(Vec<T>::loadu(scale + i, c), acc, Vec<T>::loadu(y + i, c)).store(y + i, c);
    });
    return;
  }
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
  return {&dot<T>,       &dots<T>,      &transpose_rows<T, T>, &transpose_rows<T, uint16_t>, &axpy<T>,    &axpy4<T>,       &sum<T>,
          &row_max<T>,   &row_lse<T>,   &exp_store<T>,  &vlog<T>,        &add_scalar<T>,
          &dot_exp<T>,   &prob_grad<T>, &scaled_softmax<T>, &softmax_grad<T>, Vec<T>::size()};
}

}  // namespace

extern const MatmulKernels matmul_table = {row_kernels<float>(), row_kernels<double>()};

}  // namespace CPU_CAPABILITY
}  // namespace xlsparse

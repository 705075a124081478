// The float32 at::vec loops of the optim CPU kernels (declared in xlsparse/optim.h).
//
// The extension is built for baseline x86-64, where at::vec is a plain array loop: measured 2.5-3.5x
// slower than torch's fused AdamW on one thread. So on x86-64 this file alone is compiled for
// AVX2+FMA, as ATen compiles its CPU_CAPABILITY=AVX2 kernels, and usable() tells the caller whether
// the CPU can run it (the scalar loop runs otherwise). Only raw pointers cross into this file.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
// The pragma enables the instructions but not the feature macros that sleef.h (the vector math
// ATen's AVX2 Vectorized declares) keys its declarations on.
#ifndef __AVX2__
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/cpu/vec/vec.h>

#include <cstring>

#include "xlsparse/optim.h"

namespace xlsparse {

using FVec = at::vec::Vectorized<float>;

template <>
struct ElemOps<FVec> {
  static FVec sqrt(FVec x) { return x.sqrt(); }
  static FVec max(FVec a, FVec b) { return at::vec::maximum(a, b); }
  static FVec sign(FVec x) { return x.gt(FVec(0.f)) - x.lt(FVec(0.f)); }
};

namespace vec_loops {
namespace {

constexpr int64_t kV = FVec::size();

// True when any of the kV mask bytes at m is set.
inline bool any_set(const bool* m) {
  for (int64_t b = 0; b < kV; b += 8) {
    uint64_t word;
    std::memcpy(&word, m + b, 8);
    if (word) return true;
  }
  return false;
}

// All bits set in the lanes whose mask byte is true, for FVec::blendv.
inline FVec lanes_of(const bool* m) {
#if defined(__x86_64__)
  static_assert(kV == 8, "AVX2 holds 8 floats");
  uint64_t word;
  std::memcpy(&word, m, 8);
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(word)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
#else
  float lanes[kV];
  for (int64_t l = 0; l < kV; ++l) lanes[l] = m[l] ? -1.f : 0.f;  // blendv reads the sign bit
  return FVec::loadu(lanes);
#endif
}

// Stores the new value where the mask is set and the old one elsewhere (all of v when mask is
// null): unselected entries are rewritten with the bits just read, so they never change.
inline void store_selected(float* dst, const FVec& old, const FVec& v, const FVec* lanes) {
  (lanes ? FVec::blendv(old, v, *lanes) : v).store(dst);
}

}  // namespace

bool usable() {
#if defined(__x86_64__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return true;
#endif
}

int64_t adamw(const FloatJob& q, int64_t begin, int64_t end, const AdamwCoef<float>& c, bool amsgrad) {
  const bool l1 = q.init != nullptr;
  int64_t j = begin;
  for (; j + kV <= end; j += kV) {
    const bool* mask = q.mask ? q.mask + j : nullptr;
    if (mask && !any_set(mask)) continue;  // sparse masks skip most of p, g and the state
    const FVec lanes = mask ? lanes_of(mask) : FVec(0.f);
    const FVec* sel = mask ? &lanes : nullptr;
    const FVec p0 = FVec::loadu(q.p + j), m0 = FVec::loadu(q.s0 + j), v0 = FVec::loadu(q.s1 + j);
    const FVec vmax0 = amsgrad ? FVec::loadu(q.s2 + j) : FVec(0.f);
    const FVec init = l1 ? FVec::loadu(q.init + j) : FVec(0.f);
    FVec p = p0, m = m0, v = v0, vmax = vmax0;
    adamw_update(p, FVec::loadu(q.g + j), m, v, vmax, init, c, amsgrad, l1);
    store_selected(q.p + j, p0, p, sel);
    store_selected(q.s0 + j, m0, m, sel);
    store_selected(q.s1 + j, v0, v, sel);
    if (amsgrad) store_selected(q.s2 + j, vmax0, vmax, sel);
  }
  return j;
}

int64_t adamw_compact(const FloatJob& q, const int32_t* idx, int64_t begin, int64_t end, const AdamwCoef<float>& c,
                      bool amsgrad) {
  using IVec = at::vec::Vectorized<int32_t>;
  constexpr int64_t kAhead = 64;  // prefetch distance in entries: each one is a cache miss on p and g
  const bool l1 = q.init != nullptr;
  int64_t j = begin;
  for (; j + kV <= end; j += kV) {
    if (j + kAhead + kV <= end) {
      for (int64_t l = 0; l < kV; ++l) {
        __builtin_prefetch(q.p + idx[j + kAhead + l], 1);
        __builtin_prefetch(q.g + idx[j + kAhead + l], 0);
      }
    }
    const IVec at = IVec::loadu(idx + j);
    FVec p = at::vec::gather<sizeof(float)>(q.p, at), m = FVec::loadu(q.s0 + j), v = FVec::loadu(q.s1 + j);
    FVec vmax = amsgrad ? FVec::loadu(q.s2 + j) : FVec(0.f);
    const FVec init = l1 ? FVec::loadu(q.init + j) : FVec(0.f);
    adamw_update(p, at::vec::gather<sizeof(float)>(q.g, at), m, v, vmax, init, c, amsgrad, l1);
    float out[kV];
    p.store(out);
    for (int64_t l = 0; l < kV; ++l) q.p[idx[j + l]] = out[l];  // AVX2 has no scatter
    m.store(q.s0 + j);
    v.store(q.s1 + j);
    if (amsgrad) vmax.store(q.s2 + j);
  }
  return j;
}

int64_t masked_add(float* dst, const float* src, const bool* mask, int64_t n) {
  int64_t i = 0;
  for (; i + kV <= n; i += kV)
    (FVec::loadu(dst + i) + FVec::blendv(FVec(0.f), FVec::loadu(src + i), lanes_of(mask + i))).store(dst + i);
  return i;
}

int64_t sgd(const FloatJob& q, int64_t begin, int64_t end, const SgdCoef<float>& c, bool first, bool momentum,
            bool nesterov) {
  int64_t j = begin;
  for (; j + kV <= end; j += kV) {
    const bool* mask = q.mask ? q.mask + j : nullptr;
    if (mask && !any_set(mask)) continue;
    const FVec lanes = mask ? lanes_of(mask) : FVec(0.f);
    const FVec* sel = mask ? &lanes : nullptr;
    const FVec p0 = FVec::loadu(q.p + j);
    const FVec buf0 = momentum ? FVec::loadu(q.s0 + j) : FVec(0.f);
    FVec p = p0, buf = buf0;
    sgd_update(p, FVec::loadu(q.g + j), buf, first, c, momentum, nesterov);
    store_selected(q.p + j, p0, p, sel);
    if (momentum) store_selected(q.s0 + j, buf0, buf, sel);
  }
  return j;
}

}  // namespace vec_loops
}  // namespace xlsparse

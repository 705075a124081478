// The float32 at::vec loops of the optim CPU kernels (the OptimKernels table of
// xlsparse/cpu_kernels.h), compiled once per CPU capability: at baseline x86-64 at::vec is a plain
// array loop, measured 2.5-3.5x slower than torch's fused AdamW on one thread.
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>

#include "xlsparse/cpu_kernels.h"

namespace xlsparse {

using FVec = at::vec::Vectorized<float>;

template <>
struct ElemOps<FVec> {
  static FVec sqrt(FVec x) { return x.sqrt(); }
  static FVec max(FVec a, FVec b) { return at::vec::maximum(a, b); }
  static FVec sign(FVec x) { return x.gt(FVec(0.f)) - x.lt(FVec(0.f)); }
};

namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kV = FVec::size();

// True when any of the kV mask bytes at m is set. Reads exactly those kV bytes: kV is 4 with
// 128-bit vectors (NEON), where 8-byte words read past the end of the mask.
inline bool any_set(const bool* m) {
  using Word = std::conditional_t<kV % 8 == 0, uint64_t, uint32_t>;
  static_assert(kV % sizeof(Word) == 0, "mask bytes per vector");
  for (int64_t b = 0; b < kV; b += sizeof(Word)) {
    Word word;
    std::memcpy(&word, m + b, sizeof(Word));
    if (word) return true;
  }
  return false;
}

// All bits set in the lanes whose mask byte is true, for FVec::blendv. Widening the bytes in
// registers: at::vec's VecMask::from goes through memory, measured 20% slower on the dense-mask step.
inline FVec lanes_of(const bool* m) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
  return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_test_epi32_mask(wide, wide)));
#elif defined(CPU_CAPABILITY_AVX2)
  uint64_t word;
  std::memcpy(&word, m, 8);
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(word)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256()));
#else
  return at::vec::VecMask<float, 1>::from(m);
#endif
}

// Stores the new value where the mask is set and the old one elsewhere (all of v when mask is
// null): unselected entries are rewritten with the bits just read, so they never change.
inline void store_selected(float* dst, const FVec& old, const FVec& v, const FVec* lanes) {
  (lanes ? FVec::blendv(old, v, *lanes) : v).store(dst);
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
    for (int64_t l = 0; l < kV; ++l) q.p[idx[j + l]] = out[l];  // at::vec has no scatter
    m.store(q.s0 + j);
    v.store(q.s1 + j);
    if (amsgrad) vmax.store(q.s2 + j);
  }
  return j;
}

int64_t masked_add(float* dst, const float* src, const bool* mask, int64_t n, bool overwrite) {
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    // a blend, not + 0: an entry outside the mask keeps its bits (-0.0)
    const FVec kept = overwrite ? FVec(0.f) : FVec::loadu(dst + i);
    FVec::blendv(kept, kept + FVec::loadu(src + i), lanes_of(mask + i)).store(dst + i);
  }
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

}  // namespace

extern const OptimKernels optim_table = {&adamw, &adamw_compact, &masked_add, &sgd};

}  // namespace CPU_CAPABILITY
}  // namespace xlsparse

// dst[i] += src[i] where m[i]: multi_mask_weight_grad's masked accumulation and SpMM's write-back
// to token-major memory, on the CPU. With `overwrite`, dst is taken as zeros and not read (an
// uninitialised buffer's first piece): dst[i] = m[i] ? 0 + src[i] : 0, the bits of the add into zeros.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "xlsparse/cpu_kernels.h"

namespace xlsparse {

// For i in [begin, end). Exact: an entry outside the mask keeps its bits (-0.0 included: adding
// +0.0 would not), and an Inf or NaN of src outside it never reaches dst. Branch-free, a select
// on the bits (a random mask would mispredict every other entry: measured 7x slower with a ?:
// branch); fp32 runs the vector kernel of the chosen CPU capability up to its tail.
template <typename scalar_t>
void masked_add(scalar_t* dst, const scalar_t* src, const bool* m, int64_t begin, int64_t end,
                bool overwrite = false) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    begin += optim_kernels().masked_add(dst + begin, src + begin, m + begin, end - begin, overwrite);
  }
  using bits_t = std::conditional_t<sizeof(scalar_t) == 8, uint64_t, uint32_t>;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t before = overwrite ? scalar_t(0) : dst[i];
    const scalar_t sum = before + src[i];
    bits_t kept, added;
    std::memcpy(&kept, &before, sizeof(kept));
    std::memcpy(&added, &sum, sizeof(added));
    const bits_t select = bits_t(0) - static_cast<bits_t>(m[i]);
    const bits_t out = (added & select) | (kept & ~select);
    std::memcpy(dst + i, &out, sizeof(out));
  }
}

}  // namespace xlsparse

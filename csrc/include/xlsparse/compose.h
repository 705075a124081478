// Sparse-diff composition math, shared by csrc/cpu/compose.cpp and csrc/cuda/compose.cu.
#pragma once

#include "xlsparse/common.h"

namespace xlsparse {

// dense[i] + alpha * value, computed in the accumulation type and rounded once on store.
template <typename scalar_t>
XLS_HD scalar_t axpy_update(scalar_t dense, scalar_t value, acc_t<scalar_t> alpha) {
  using a_t = acc_t<scalar_t>;
  return static_cast<scalar_t>(static_cast<a_t>(dense) + alpha * static_cast<a_t>(value));
}

}  // namespace xlsparse

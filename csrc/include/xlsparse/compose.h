// Sparse-diff composition math, shared by csrc/cpu/compose.cpp and csrc/cuda/compose.cu.
#pragma once

#include <cstdint>
#include <cstring>

#include "xlsparse/common.h"

namespace xlsparse {

// acc + alpha * value in the accumulation type. The shares of several deltas that hit one
// element are summed with this in the order given, starting from zero.
template <typename scalar_t>
XLS_HD acc_t<scalar_t> axpy_acc(acc_t<scalar_t> acc, scalar_t value, acc_t<scalar_t> alpha) {
  return acc + alpha * static_cast<acc_t<scalar_t>>(value);
}

// dense + summed shares, in the accumulation type, rounded once on store.
template <typename scalar_t>
XLS_HD scalar_t add_shares(scalar_t dense, acc_t<scalar_t> shares) {
  return static_cast<scalar_t>(static_cast<acc_t<scalar_t>>(dense) + shares);
}

// dense[i] + alpha * value, computed in the accumulation type and rounded once on store.
template <typename scalar_t>
XLS_HD scalar_t axpy_update(scalar_t dense, scalar_t value, acc_t<scalar_t> alpha) {
  return add_shares(dense, alpha * static_cast<acc_t<scalar_t>>(value));
}

// --- global top-K by magnitude ---
// |x| as the bit pattern of a float (double for double input) with the sign bit cleared: for
// non-negative floats the bit patterns order exactly like the values, so top-K by magnitude is
// top-K of these unsigned keys. Half types widen to float exactly. NaN keys exceed the inf key.
template <typename scalar_t> struct magnitude { using key = uint32_t; using wide = float; };
template <> struct magnitude<double> { using key = uint64_t; using wide = double; };
template <typename scalar_t> using key_t = typename magnitude<scalar_t>::key;

template <typename scalar_t>
XLS_HD key_t<scalar_t> magnitude_key(scalar_t x) {
  using wide = typename magnitude<scalar_t>::wide;
  const wide w = static_cast<wide>(x);
  key_t<scalar_t> bits;
  memcpy(&bits, &w, sizeof bits);
  return bits & ~(key_t<scalar_t>(1) << (8 * sizeof(bits) - 1));
}

// The key of +inf; a larger key is a NaN.
template <typename scalar_t>
XLS_HD key_t<scalar_t> inf_key() {
  return sizeof(key_t<scalar_t>) == 4 ? key_t<scalar_t>(0x7f800000u) : key_t<scalar_t>(0x7ff0000000000000ull);
}

// Radix select reads one digit of the key per pass, most significant first.
constexpr int kRadixBits = 16;
constexpr int64_t kRadixBins = int64_t(1) << kRadixBits;

}  // namespace xlsparse

// --- host-side argument checks shared by the CPU and CUDA entry points ---
#include <string>
#include <vector>

#include "xlsparse/checks.h"

namespace xlsparse {

// Radix select step: the digit (histogram bin) that holds the k_left-th largest candidate,
// walking from the largest digit; k_left becomes that candidate's rank inside the bin.
inline int64_t select_digit(const int64_t* hist, int64_t bins, int64_t& k_left) {
  int64_t b = bins - 1;
  for (; b > 0 && hist[b] < k_left; --b) k_left -= hist[b];
  return b;
}

// Entries grouped by the tensor they update, in the order given.
inline std::vector<std::vector<int64_t>> entries_by_target(int64_t num_dense, at::IntArrayRef target) {
  std::vector<std::vector<int64_t>> groups(num_dense);
  for (int64_t e = 0; e < static_cast<int64_t>(target.size()); ++e) groups[target[e]].push_back(e);
  return groups;
}

}  // namespace xlsparse

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

// Entry e pairs indices[e] and values[e] with dense[target[e]]. The metadata of every entry is
// checked here; the index values (sorted, unique, in range) in one batched pass per backend
// (check_entry_indices), before anything is written. Messages name the entry.
inline void check_diff_entries(const char* op, at::TensorList dense, at::TensorList indices, at::TensorList values,
                               at::IntArrayRef target) {
  const int64_t n = static_cast<int64_t>(indices.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == n && static_cast<int64_t>(target.size()) == n, op,
                    ": indices, values and target must have one entry each, got ", n, ", ", values.size(), ", ",
                    target.size());
  std::vector<at::ScalarType> index_type(dense.size(), at::kByte);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t t = target[e];
    TORCH_CHECK_INDEX(t >= 0 && t < static_cast<int64_t>(dense.size()), op, ": target[", e, "] = ", t,
                      " is not a position in dense (", dense.size(), " tensors)");
    const std::string where = std::string(op) + " entry " + std::to_string(e) + " (dense[" + std::to_string(t) + "])";
    check_sparse_update(where.c_str(), dense[t], indices[e], values[e]);
    TORCH_CHECK_TYPE(index_type[t] == at::kByte || index_type[t] == indices[e].scalar_type(), where,
                     ": every entry of one tensor must use one index dtype");
    index_type[t] = indices[e].scalar_type();
  }
}

inline std::string entry_name(const char* op, int64_t e, int64_t t) {
  return std::string(op) + " entry " + std::to_string(e) + " (dense[" + std::to_string(t) + "])";
}

// The error for the first bad index of an entry: `value` at `pos`, after `prev` (when pos > 0).
[[noreturn]] inline void raise_bad_index(const std::string& where, int64_t pos, int64_t value, int64_t prev,
                                         int64_t numel) {
  TORCH_CHECK_INDEX(value >= 0 && value < numel, where, ": index ", value, " at position ", pos,
                    " is out of range [0, ", numel, ")");
  TORCH_CHECK_VALUE(false, where, ": indices must be sorted and unique; position ", pos, " holds ", value, " after ", prev);
}

// apply_diffs_'s alphas and saved outputs: one per entry; saved[e] is contiguous, like values[e].
inline void check_saved(const char* op, at::TensorList values, at::ArrayRef<double> alphas, at::TensorList saved) {
  TORCH_CHECK_VALUE(alphas.size() == values.size() && saved.size() == values.size(), op, ": alphas and saved need ",
                    values.size(), " entries, got ", alphas.size(), " and ", saved.size());
  for (size_t e = 0; e < values.size(); ++e)
    TORCH_CHECK_VALUE(saved[e].is_contiguous() && saved[e].numel() == values[e].numel() &&
                          saved[e].scalar_type() == values[e].scalar_type() && saved[e].device() == values[e].device(),
                      op, ": saved[", e, "] must be a contiguous tensor like values[", e, "]");
}

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

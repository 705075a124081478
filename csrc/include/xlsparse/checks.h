// Argument checks shared by the CPU and CUDA entry points. Messages name the op and the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>

#include "xlsparse/common.h"

namespace xlsparse {

// dense is the tensor written in place; indices index dense.view(-1); values pair with indices.
inline void check_sparse_update(const char* op, const at::Tensor& dense, const at::Tensor& indices,
                                const at::Tensor& values) {
  TORCH_CHECK_VALUE(dense.is_contiguous(), op, ": dense must be contiguous");
  TORCH_CHECK_VALUE(indices.dim() == 1 && values.dim() == 1, op, ": indices and values must be 1-D, got ",
              indices.sizes(), " and ", values.sizes());
  TORCH_CHECK_VALUE(indices.numel() == values.numel(), op, ": indices has ", indices.numel(),
              " entries but values has ", values.numel());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(dense.scalar_type()), op, ": dense must be floating point, got ",
                   dense.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == dense.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " does not match dense dtype ", dense.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == dense.device() && values.device() == dense.device(), op,
              ": dense, indices and values must be on one device, got ", dense.device(), ", ",
              indices.device(), ", ", values.device());
}

// Indices must be strictly increasing (sorted, no duplicates) and inside [0, numel). Checked before
// any write so that bad input never leaves a half-updated tensor. On CPU it is one parallel pass.
inline void check_indices(const char* op, const at::Tensor& indices, int64_t numel) {
  const int64_t k = indices.numel();
  if (k == 0) return;
  if (!indices.is_cpu()) {
    const auto lo = indices.min().item<int64_t>();
    const auto hi = indices.max().item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < numel, op, ": indices out of range [0, ", numel, "): min ", lo, ", max ", hi);
    if (k > 1) {
      auto ok = (indices.slice(0, 1) > indices.slice(0, 0, k - 1)).all().item<bool>();
      TORCH_CHECK_VALUE(ok, op, ": indices must be sorted and unique");
    }
    return;
  }
  auto idx = indices.contiguous();
  XLS_DISPATCH_INDEX(idx.scalar_type(), op, [&] {
    const index_t* p = idx.data_ptr<index_t>();
    std::atomic<int64_t> bad_range{-1}, bad_order{-1};
    at::parallel_for(0, k, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t v = p[i];
        if (v < 0 || v >= numel) { bad_range = i; return; }
        if (i > 0 && p[i - 1] >= p[i]) { bad_order = i; return; }
      }
    });
    const int64_t r = bad_range.load(), o = bad_order.load();
    TORCH_CHECK_INDEX(r < 0, op, ": index ", static_cast<int64_t>(p[r < 0 ? 0 : r]), " at position ", r,
                " is out of range [0, ", numel, ")");
    TORCH_CHECK_VALUE(o < 0, op, ": indices must be sorted and unique; position ", o, " holds ",
                static_cast<int64_t>(p[o < 0 ? 0 : o]), " after ", static_cast<int64_t>(p[o < 1 ? 0 : o - 1]));
  });
}

}  // namespace xlsparse

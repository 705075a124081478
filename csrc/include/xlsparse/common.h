// Helpers shared by every CPU and CUDA kernel: host/device markers, the accumulation type,
// and the dtype switches used to instantiate kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#if defined(__CUDACC__)
#define XLS_HD __host__ __device__ __forceinline__
#else
#define XLS_HD inline
#endif

namespace xlsparse {

// Half, bfloat16 and float accumulate in float; double stays double (gradcheck runs in float64).
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

// The E deltas of a list op (indices[e], values[e]) as contiguous tensors, and their entry count.
struct DeltaList {
  std::vector<at::Tensor> idx, val;
  int64_t total = 0;
  DeltaList(at::TensorList indices, at::TensorList values) : idx(indices.size()), val(values.size()) {
    for (size_t e = 0; e < indices.size(); ++e) {
      idx[e] = indices[e].contiguous();
      val[e] = values[e].contiguous();
      total += idx[e].numel();
    }
  }
};

}  // namespace xlsparse

// Value dtypes every op accepts.
#define XLS_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Index dtypes every op accepts: int32 below 2^31 elements, int64 above.
#define XLS_DISPATCH_INDEX(TYPE, NAME, ...)                                   \
  [&] {                                                                       \
    if ((TYPE) == at::kInt) {                                                 \
      using index_t = int32_t;                                                \
      return __VA_ARGS__();                                                   \
    }                                                                         \
    TORCH_CHECK_TYPE((TYPE) == at::kLong, NAME, ": indices must be int32 or int64, got ", (TYPE)); \
    using index_t = int64_t;                                                  \
    return __VA_ARGS__();                                                     \
  }()

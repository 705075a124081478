// CPU kernels of the compose family.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "xlsparse/checks.h"
#include "xlsparse/compose.h"

namespace xlsparse {
namespace {

void sparse_axpy_cpu(at::Tensor dense, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_sparse_update("sparse_axpy_", dense, indices, values);
  check_indices("sparse_axpy_", indices, dense.numel());
  const int64_t k = indices.numel();
  if (k == 0) return;
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  XLS_DISPATCH_FLOATS(dense.scalar_type(), "sparse_axpy_", [&] {
    XLS_DISPATCH_INDEX(idx.scalar_type(), "sparse_axpy_", [&] {
      scalar_t* d = dense.data_ptr<scalar_t>();
      const index_t* ip = idx.data_ptr<index_t>();
      const scalar_t* vp = val.data_ptr<scalar_t>();
      const auto a = static_cast<acc_t<scalar_t>>(alpha);
      // Indices are unique, so threads never write the same element.
      at::parallel_for(0, k, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) d[ip[i]] = axpy_update(d[ip[i]], vp[i], a);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CPU, m) { m.impl("sparse_axpy_", &sparse_axpy_cpu); }

}  // namespace xlsparse

// CUDA kernels of the compose family.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "xlsparse/checks.h"
#include "xlsparse/compose.h"

namespace xlsparse {
namespace {

template <typename scalar_t, typename index_t>
__global__ void sparse_axpy_kernel(scalar_t* __restrict__ dense, const index_t* __restrict__ indices,
                                   const scalar_t* __restrict__ values, acc_t<scalar_t> alpha, int64_t k) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < k;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t j = indices[i];
    dense[j] = axpy_update(dense[j], values[i], alpha);
  }
}

void sparse_axpy_cuda(at::Tensor dense, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_sparse_update("sparse_axpy_", dense, indices, values);
  check_indices("sparse_axpy_", indices, dense.numel());
  const int64_t k = indices.numel();
  if (k == 0) return;
  const c10::cuda::CUDAGuard guard(dense.device());
  auto idx = indices.contiguous();
  auto val = values.contiguous();
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((k + threads - 1) / threads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  XLS_DISPATCH_FLOATS(dense.scalar_type(), "sparse_axpy_", [&] {
    XLS_DISPATCH_INDEX(idx.scalar_type(), "sparse_axpy_", [&] {
      sparse_axpy_kernel<scalar_t, index_t><<<blocks, threads, 0, stream>>>(
          dense.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), val.data_ptr<scalar_t>(),
          static_cast<acc_t<scalar_t>>(alpha), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CUDA, m) { m.impl("sparse_axpy_", &sparse_axpy_cuda); }

}  // namespace xlsparse

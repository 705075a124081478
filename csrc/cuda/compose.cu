// CUDA kernels of the compose family.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

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

// Position of j in the sorted a[lo, hi), or the insertion point.
template <typename index_t>
__device__ __forceinline__ int64_t lower_bound(const index_t* a, int64_t lo, int64_t hi, int64_t j) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(a[mid]) < j) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// --- apply_diffs_ / restore_diffs_ ---

// CUDA's limit on a grid's y axis, which holds one entry per row in the kernels below.
constexpr int64_t kMaxGridY = 65535;

// first_bad[e] = the lowest position of entry e whose index is out of range or not above the
// previous one. Rows: indices pointer, length, numel of the target tensor.
template <typename index_t>
__global__ void check_entries_kernel(const int64_t* __restrict__ rows, unsigned long long* __restrict__ first_bad,
                                     int64_t row0) {
  const int64_t r = row0 + blockIdx.y;
  const int64_t* row = rows + 3 * r;
  const auto* idx = reinterpret_cast<const index_t*>(row[0]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row[1];
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t v = idx[i];
    if (v < 0 || v >= row[2] || (i > 0 && static_cast<int64_t>(idx[i - 1]) >= v))
      atomicMin(first_bad + r, static_cast<unsigned long long>(i));
  }
}

// Every entry's indices checked in one launch per index dtype and one sync, before any write.
void check_entry_indices(const char* op, at::TensorList dense, const std::vector<at::Tensor>& idx,
                         at::IntArrayRef target) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t worst_e = -1, worst_i = 0;
  for (const auto type : {at::kInt, at::kLong}) {
    std::vector<int64_t> entries, rows;
    int64_t max_len = 0;
    for (int64_t e = 0; e < static_cast<int64_t>(idx.size()); ++e) {
      if (idx[e].scalar_type() != type || idx[e].numel() == 0) continue;
      entries.push_back(e);
      rows.insert(rows.end(), {reinterpret_cast<int64_t>(idx[e].data_ptr()), idx[e].numel(), dense[target[e]].numel()});
      max_len = std::max(max_len, idx[e].numel());
    }
    if (entries.empty()) continue;
    const int64_t m = static_cast<int64_t>(entries.size());
    auto table = at::tensor(rows, at::kLong).to(idx[entries[0]].device());
    auto first_bad = at::full({m}, std::numeric_limits<int64_t>::max(), table.options());
    // One row per entry on grid axis y, whose limit is 65535: more entries (a model of 723 tensors
    // and 91 diffs) launch again from row0.
    for (int64_t row0 = 0; row0 < m; row0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>((max_len + 255) / 256, 4096)),
                      static_cast<unsigned>(std::min(kMaxGridY, m - row0)));
      XLS_DISPATCH_INDEX(type, "apply_diffs_", [&] {
        check_entries_kernel<index_t><<<grid, 256, 0, stream>>>(
            table.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()), row0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    const auto bad = first_bad.cpu();
    const int64_t* b = bad.data_ptr<int64_t>();
    for (int64_t r = 0; r < m; ++r)
      if (b[r] != std::numeric_limits<int64_t>::max() && (worst_e < 0 || entries[r] < worst_e)) {
        worst_e = entries[r];
        worst_i = b[r];
      }
  }
  if (worst_e < 0) return;
  const auto& t = idx[worst_e];
  raise_bad_index(entry_name(op, worst_e, target[worst_e]), worst_i, t[worst_i].item<int64_t>(),
                  worst_i > 0 ? t[worst_i - 1].item<int64_t>() : 0, dense[target[worst_e]].numel());
}
// One row per entry: pointers to its indices, values, saved values and dense tensor, its length,
// and [first, last) rows of the entries on the same tensor (rows are grouped by tensor).
enum Field { kIdx, kVal, kSaved, kDense, kLen, kFirst, kLast, kFields };

template <typename scalar_t, typename index_t>
__global__ void apply_diffs_kernel(const int64_t* __restrict__ table, const double* __restrict__ alphas,
                                   int64_t row0) {
  using a_t = acc_t<scalar_t>;
  const int64_t e = row0 + blockIdx.y;
  const int64_t* row = table + e * kFields;
  const auto* idx = reinterpret_cast<const index_t*>(row[kIdx]);
  auto* d = reinterpret_cast<scalar_t*>(row[kDense]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row[kLen];
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t j = idx[i];
    // The first entry that holds j owns it: it sums every entry's share and stores once.
    bool owner = true;
    for (int64_t f = row[kFirst]; f < e && owner; ++f) {
      const int64_t* r = table + f * kFields;
      const auto* fi = reinterpret_cast<const index_t*>(r[kIdx]);
      const int64_t p = lower_bound(fi, 0, r[kLen], j);
      owner = !(p < r[kLen] && fi[p] == j);
    }
    if (!owner) continue;
    const scalar_t old = d[j];
    a_t acc = 0;
    for (int64_t f = e; f < row[kLast]; ++f) {
      const int64_t* r = table + f * kFields;
      const auto* fi = reinterpret_cast<const index_t*>(r[kIdx]);
      const int64_t p = f == e ? i : lower_bound(fi, 0, r[kLen], j);
      if (p >= r[kLen] || fi[p] != j) continue;
      reinterpret_cast<scalar_t*>(r[kSaved])[p] = old;
      acc = axpy_acc(acc, reinterpret_cast<const scalar_t*>(r[kVal])[p], static_cast<a_t>(alphas[f]));
    }
    d[j] = add_shares(old, acc);
  }
}

template <typename scalar_t, typename index_t>
__global__ void restore_diffs_kernel(const int64_t* __restrict__ table, int64_t row0) {
  const int64_t* row = table + (row0 + blockIdx.y) * kFields;
  const auto* idx = reinterpret_cast<const index_t*>(row[kIdx]);
  const auto* saved = reinterpret_cast<const scalar_t*>(row[kSaved]);
  auto* d = reinterpret_cast<scalar_t*>(row[kDense]);
  // Entries that share an element saved the same value: concurrent stores write equal bits.
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row[kLen];
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    d[idx[i]] = saved[i];
}

// Launches `launch(kind, table, alphas, grid, row0)` per (dense dtype, index dtype) group of entries, once
// per kMaxGridY rows: launches run in order on the stream, so an entry's owner (the first entry of
// its tensor that holds the index) has written before a later launch's entries skip that index.
template <typename Launch>
void for_each_entry_group(const char* op, at::TensorList dense, const std::vector<at::Tensor>& idx,
                          const std::vector<at::Tensor>& val, const std::vector<at::Tensor>& saved,
                          at::IntArrayRef target, at::ArrayRef<double> alphas, Launch launch) {
  const auto groups = entries_by_target(static_cast<int64_t>(dense.size()), target);
  // Rows of one launch: every entry whose tensor has this dtype pair, grouped by tensor.
  std::vector<std::pair<at::ScalarType, at::ScalarType>> kinds;
  for (const auto& g : groups)
    if (!g.empty()) {
      const auto kind = std::make_pair(dense[target[g[0]]].scalar_type(), idx[g[0]].scalar_type());
      if (std::find(kinds.begin(), kinds.end(), kind) == kinds.end()) kinds.push_back(kind);
    }
  for (const auto& kind : kinds) {
    std::vector<int64_t> rows;
    std::vector<double> row_alpha;
    int64_t max_len = 0;
    for (const auto& g : groups) {
      if (g.empty() || std::make_pair(dense[target[g[0]]].scalar_type(), idx[g[0]].scalar_type()) != kind) continue;
      const int64_t first = static_cast<int64_t>(row_alpha.size());
      const int64_t last = first + static_cast<int64_t>(g.size());
      for (int64_t e : g) {
        const int64_t fields[kFields] = {reinterpret_cast<int64_t>(idx[e].data_ptr()),
                                         reinterpret_cast<int64_t>(val[e].data_ptr()),
                                         reinterpret_cast<int64_t>(saved[e].data_ptr()),
                                         reinterpret_cast<int64_t>(dense[target[e]].data_ptr()),
                                         idx[e].numel(), first, last};
        rows.insert(rows.end(), fields, fields + kFields);
        row_alpha.push_back(alphas.empty() ? 0.0 : alphas[e]);
        max_len = std::max(max_len, idx[e].numel());
      }
    }
    const int64_t m = static_cast<int64_t>(row_alpha.size());
    if (max_len == 0) continue;
    const auto device = dense[0].device();
    auto table = at::tensor(rows, at::kLong).to(device);
    auto alpha_t = at::tensor(row_alpha, at::kDouble).to(device);
    for (int64_t row0 = 0; row0 < m; row0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>((max_len + 255) / 256, 4096)),
                      static_cast<unsigned>(std::min(kMaxGridY, m - row0)));
      launch(kind, table, alpha_t, grid, row0);
    }
  }
}

void apply_diffs_cuda(at::TensorList dense, at::TensorList indices, at::TensorList values, at::IntArrayRef target,
                      at::ArrayRef<double> alphas, at::TensorList saved_out) {
  check_diff_entries("apply_diffs_", dense, indices, values, target);
  check_saved("apply_diffs_", values, alphas, saved_out);
  const int64_t n = static_cast<int64_t>(indices.size());
  std::vector<at::Tensor> idx(n), val(n), saved(saved_out.begin(), saved_out.end());
  for (int64_t e = 0; e < n; ++e) {
    idx[e] = indices[e].contiguous();
    val[e] = values[e].contiguous();
  }
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(dense[0].device());
  check_entry_indices("apply_diffs_", dense, idx, target);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for_each_entry_group("apply_diffs_", dense, idx, val, saved, target, alphas,
                       [&](auto kind, const at::Tensor& table, const at::Tensor& alpha_t, dim3 grid, int64_t row0) {
    XLS_DISPATCH_FLOATS(kind.first, "apply_diffs_", [&] {
      XLS_DISPATCH_INDEX(kind.second, "apply_diffs_", [&] {
        apply_diffs_kernel<scalar_t, index_t><<<grid, 256, 0, stream>>>(table.data_ptr<int64_t>(),
                                                                         alpha_t.data_ptr<double>(), row0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void restore_diffs_cuda(at::TensorList dense, at::TensorList indices, at::TensorList saved, at::IntArrayRef target) {
  check_diff_entries("restore_diffs_", dense, indices, saved, target);
  const int64_t n = static_cast<int64_t>(indices.size());
  if (n == 0) return;
  std::vector<at::Tensor> idx(n), sv(n);
  for (int64_t e = 0; e < n; ++e) {
    idx[e] = indices[e].contiguous();
    sv[e] = saved[e].contiguous();
  }
  const c10::cuda::CUDAGuard guard(dense[0].device());
  check_entry_indices("restore_diffs_", dense, idx, target);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for_each_entry_group("restore_diffs_", dense, idx, sv, sv, target, {},
                       [&](auto kind, const at::Tensor& table, const at::Tensor&, dim3 grid, int64_t row0) {
    XLS_DISPATCH_FLOATS(kind.first, "restore_diffs_", [&] {
      XLS_DISPATCH_INDEX(kind.second, "restore_diffs_", [&] {
        restore_diffs_kernel<scalar_t, index_t><<<grid, 256, 0, stream>>>(table.data_ptr<int64_t>(), row0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

// --- merge_deltas: the deltas are concatenated; offsets[e] is where delta e starts ---

__device__ __forceinline__ int64_t segment_of(const int64_t* offsets, int64_t n, int64_t m) {
  int64_t e = 0;
  while (e + 1 < n && offsets[e + 1] <= m) ++e;
  return e;
}

// owned[m] = 1 when no earlier delta holds the index at m: that element writes the union entry.
__global__ void merge_owned_kernel(const int64_t* __restrict__ idx, const int64_t* __restrict__ offsets, int64_t n,
                                   int64_t total, int64_t* __restrict__ owned) {
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < total;
       m += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t e = segment_of(offsets, n, m), j = idx[m];
    int64_t own = 1;
    for (int64_t f = 0; f < e && own; ++f) {
      const int64_t p = lower_bound(idx, offsets[f], offsets[f + 1], j);
      own = !(p < offsets[f + 1] && idx[p] == j);
    }
    owned[m] = own;
  }
}

// prefix[m] counts owned elements before m; an owned element's union position is the number of
// distinct indices below it, summed over the deltas.
template <typename scalar_t>
__global__ void merge_write_kernel(const int64_t* __restrict__ idx, const scalar_t* __restrict__ val,
                                   const int64_t* __restrict__ offsets, const double* __restrict__ weights, int64_t n,
                                   int64_t total, const int64_t* __restrict__ prefix, int64_t* __restrict__ out_idx,
                                   scalar_t* __restrict__ out_val) {
  using a_t = acc_t<scalar_t>;
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < total;
       m += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (prefix[m + 1] == prefix[m]) continue;  // not owned
    const int64_t e = segment_of(offsets, n, m), j = idx[m];
    int64_t pos = 0;
    a_t acc = 0;
    for (int64_t f = 0; f < n; ++f) {
      const int64_t p = f == e ? m : lower_bound(idx, offsets[f], offsets[f + 1], j);
      pos += prefix[p] - prefix[offsets[f]];
      if (f >= e && p < offsets[f + 1] && idx[p] == j) acc = axpy_acc(acc, val[p], static_cast<a_t>(weights[f]));
    }
    out_idx[pos] = j;
    out_val[pos] = static_cast<scalar_t>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor> merge_deltas_cuda(at::TensorList indices, at::TensorList values,
                                                     at::ArrayRef<double> weights, int64_t numel) {
  const char* op = "merge_deltas";
  check_merge(op, indices, values, weights, numel);
  const c10::cuda::CUDAGuard guard(indices[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = static_cast<int64_t>(indices.size());
  std::vector<at::Tensor> idx64;
  std::vector<int64_t> offsets(1, 0);
  for (const auto& t : indices) {
    idx64.push_back(t.to(at::kLong));
    offsets.push_back(offsets.back() + t.numel());
  }
  const int64_t total = offsets.back();
  auto idx = at::cat(idx64);
  auto val = at::cat(values.vec());
  auto off = at::tensor(offsets, at::kLong).to(idx.device());
  auto w = at::tensor(std::vector<double>(weights.begin(), weights.end()), at::kDouble).to(idx.device());
  auto owned = at::empty({total}, idx.options());
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 65535)));
  if (total > 0) {
    merge_owned_kernel<<<blocks, 256, 0, stream>>>(idx.data_ptr<int64_t>(), off.data_ptr<int64_t>(), n, total,
                                                   owned.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto prefix = at::cat({at::zeros({1}, idx.options()), owned.cumsum(0)});
  const int64_t size = prefix[total].item<int64_t>();
  auto out_idx = at::empty({size}, idx.options());
  auto out_val = at::empty({size}, val.options());
  if (total > 0) {
    XLS_DISPATCH_FLOATS(val.scalar_type(), "merge_deltas", [&] {
      merge_write_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          idx.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), off.data_ptr<int64_t>(), w.data_ptr<double>(), n, total,
          prefix.data_ptr<int64_t>(), out_idx.data_ptr<int64_t>(), out_val.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out_idx.to(indices[0].scalar_type()), out_val};
}

// --- topk_masks: radix select, 8 bits per pass (a 256-bin histogram fits in shared memory) ---
constexpr int kGpuDigitBits = 8;
constexpr int kGpuBins = 1 << kGpuDigitBits;
// Rows per tensor: data pointer, numel, mask pointer.
enum TopkField { kData, kNumel, kMask, kTopkFields };

template <typename scalar_t>
__global__ void topk_hist_kernel(const int64_t* __restrict__ rows, uint64_t prefix, uint64_t known, int shift,
                                 unsigned long long* __restrict__ hist, int* __restrict__ has_nan) {
  __shared__ unsigned int local[kGpuBins];
  for (int b = threadIdx.x; b < kGpuBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t* row = rows + kTopkFields * blockIdx.y;
  const auto* x = reinterpret_cast<const scalar_t*>(row[kData]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row[kNumel];
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const uint64_t kx = magnitude_key(x[i]);
    if (kx > inf_key<scalar_t>()) has_nan[blockIdx.y] = 1;
    if ((kx & known) == prefix) atomicAdd(&local[(kx >> shift) & (kGpuBins - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kGpuBins; b += blockDim.x)
    if (local[b]) atomicAdd(hist + b, static_cast<unsigned long long>(local[b]));
}

template <typename scalar_t>
__global__ void topk_mask_kernel(const int64_t* __restrict__ rows, uint64_t threshold) {
  const int64_t* row = rows + kTopkFields * blockIdx.y;
  const auto* x = reinterpret_cast<const scalar_t*>(row[kData]);
  auto* m = reinterpret_cast<bool*>(row[kMask]);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row[kNumel];
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    m[i] = magnitude_key(x[i]) >= threshold;
}

// Split ties: chunks of kTieChunk elements in global order; rows per chunk: data, begin, end, mask.
constexpr int64_t kTieChunk = 4096;

template <typename scalar_t>
__global__ void topk_count_ties_kernel(const int64_t* __restrict__ chunks, uint64_t threshold,
                                       int64_t* __restrict__ counts) {
  const int64_t* row = chunks + 4 * blockIdx.x;
  const auto* x = reinterpret_cast<const scalar_t*>(row[0]);
  int64_t c = 0;
  for (int64_t i = row[1] + threadIdx.x; i < row[2]; i += blockDim.x) c += magnitude_key(x[i]) == threshold;
  atomicAdd(reinterpret_cast<unsigned long long*>(counts + blockIdx.x), static_cast<unsigned long long>(c));
}

// One thread per chunk walks it in order, so tied entries are ranked by position.
template <typename scalar_t>
__global__ void topk_mask_ties_kernel(const int64_t* __restrict__ chunks, int64_t num_chunks, uint64_t threshold,
                                      const int64_t* __restrict__ ties_before, int64_t k_left) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= num_chunks) return;
  const int64_t* row = chunks + 4 * c;
  const auto* x = reinterpret_cast<const scalar_t*>(row[0]);
  auto* m = reinterpret_cast<bool*>(row[3]);
  int64_t rank = ties_before[c];
  for (int64_t i = row[1]; i < row[2]; ++i) {
    const uint64_t kx = magnitude_key(x[i]);
    const bool tie = kx == threshold;
    m[i] = kx > threshold || (tie && rank < k_left);
    rank += tie;
  }
}

template <typename scalar_t>
void topk_masks_gpu(const std::vector<at::Tensor>& ts, std::vector<at::Tensor>& masks, int64_t k) {
  using key = key_t<scalar_t>;
  constexpr int kBits = 8 * sizeof(key);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto device = ts[0].device();
  const int64_t nt = static_cast<int64_t>(ts.size());
  TORCH_CHECK_VALUE(nt <= 65535, "topk_masks: at most 65535 tensors per call on CUDA, got ", nt);
  std::vector<int64_t> rows;
  int64_t max_n = 0;
  for (int64_t t = 0; t < nt; ++t) {
    rows.insert(rows.end(), {reinterpret_cast<int64_t>(ts[t].data_ptr()), ts[t].numel(),
                             reinterpret_cast<int64_t>(masks[t].data_ptr())});
    max_n = std::max(max_n, ts[t].numel());
  }
  if (max_n == 0) return;
  auto table = at::tensor(rows, at::kLong).to(device);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((max_n + 2047) / 2048, 1024)), static_cast<unsigned>(nt));
  auto hist = at::empty({kGpuBins}, table.options());
  auto has_nan = at::zeros({nt}, table.options().dtype(at::kInt));
  uint64_t prefix = 0, known = 0;
  int64_t k_left = k;
  at::Tensor hist_cpu;
  for (int shift = kBits - kGpuDigitBits; shift >= 0; shift -= kGpuDigitBits) {
    hist.zero_();
    topk_hist_kernel<scalar_t><<<grid, 256, 0, stream>>>(table.data_ptr<int64_t>(), prefix, known, shift,
                                                          reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                                                          has_nan.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (shift == kBits - kGpuDigitBits) {
      const auto nan_cpu = has_nan.cpu();
      for (int64_t t = 0; t < nt; ++t)
        TORCH_CHECK_VALUE(nan_cpu.data_ptr<int>()[t] == 0, "topk_masks: tensors[", t, "] holds NaN");
    }
    hist_cpu = hist.cpu();
    const int64_t b = select_digit(hist_cpu.data_ptr<int64_t>(), kGpuBins, k_left);
    prefix |= static_cast<uint64_t>(b) << shift;
    known |= static_cast<uint64_t>(kGpuBins - 1) << shift;
  }
  const uint64_t threshold = prefix;
  const int64_t ties_total = hist_cpu.data_ptr<int64_t>()[threshold & (kGpuBins - 1)];
  if (k_left == ties_total) {  // every tie is taken
    topk_mask_kernel<scalar_t><<<grid, 256, 0, stream>>>(table.data_ptr<int64_t>(), threshold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  std::vector<int64_t> chunk_rows;
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t b = 0; b < ts[t].numel(); b += kTieChunk)
      chunk_rows.insert(chunk_rows.end(), {reinterpret_cast<int64_t>(ts[t].data_ptr()), b,
                                           std::min(ts[t].numel(), b + kTieChunk),
                                           reinterpret_cast<int64_t>(masks[t].data_ptr())});
  const int64_t num_chunks = static_cast<int64_t>(chunk_rows.size() / 4);
  TORCH_CHECK_VALUE(num_chunks <= 2147483647, "topk_masks: too many elements");
  auto chunks = at::tensor(chunk_rows, at::kLong).to(device);
  auto counts = at::zeros({num_chunks}, chunks.options());
  topk_count_ties_kernel<scalar_t><<<static_cast<unsigned>(num_chunks), 256, 0, stream>>>(
      chunks.data_ptr<int64_t>(), threshold, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto ties_before = (counts.cumsum(0) - counts).contiguous();
  topk_mask_ties_kernel<scalar_t><<<static_cast<unsigned>((num_chunks + 255) / 256), 256, 0, stream>>>(
      chunks.data_ptr<int64_t>(), num_chunks, threshold, ties_before.data_ptr<int64_t>(), k_left);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> topk_masks_cuda(at::TensorList tensors, int64_t k) {
  check_topk("topk_masks", tensors, k);
  std::vector<at::Tensor> ts, masks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    ts.push_back(tensors[t].contiguous());
    masks.push_back(at::zeros(tensors[t].sizes(), tensors[t].options().dtype(at::kBool)));
  }
  if (k == 0) return masks;
  const c10::cuda::CUDAGuard guard(ts[0].device());
  XLS_DISPATCH_FLOATS(ts[0].scalar_type(), "topk_masks", [&] { topk_masks_gpu<scalar_t>(ts, masks, k); });
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CUDA, m) {
  m.impl("sparse_axpy_", &sparse_axpy_cuda);
  m.impl("apply_diffs_", &apply_diffs_cuda);
  m.impl("restore_diffs_", &restore_diffs_cuda);
  m.impl("merge_deltas", &merge_deltas_cuda);
  m.impl("topk_masks", &topk_masks_cuda);
}

}  // namespace xlsparse

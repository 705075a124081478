// CUDA kernels of the optim family: the masked AdamW/SGD steps and multi_mask_weight_grad.
//
// A step is a multi-tensor launch: up to kMaxTensors parameters and kMaxBlocks blocks travel in one
// kernel argument, each block owns one chunk of one parameter's state range. The update math is
// csrc/include/xlsparse/optim.h, as on CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "xlsparse/optim.h"

namespace xlsparse {
namespace {

constexpr int kMaxTensors = 16;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 512;
constexpr int64_t kChunk = 1 << 16;  // state entries per block

enum SelKind : int8_t { kAll = 0, kMask = 1, kIdx32 = 2, kIdx64 = 3 };

// The pointers of up to kMaxTensors parameters and the (tensor, chunk) of every block.
template <typename scalar_t>
struct Batch {
  scalar_t* p[kMaxTensors];
  const scalar_t* g[kMaxTensors];
  scalar_t* s0[kMaxTensors];  // exp_avg / momentum buffer
  scalar_t* s1[kMaxTensors];  // exp_avg_sq
  scalar_t* s2[kMaxTensors];  // max_exp_avg_sq
  const scalar_t* init[kMaxTensors];
  const void* sel[kMaxTensors];
  float* step[kMaxTensors];     // shared count, or
  int32_t* own[kMaxTensors];    // per-entry counts
  int64_t n[kMaxTensors];
  int8_t kind[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// Param position of state entry j, or -1 when the mask leaves it out.
template <typename scalar_t>
__device__ __forceinline__ int64_t position(const Batch<scalar_t>& b, int t, int64_t j) {
  switch (b.kind[t]) {
    case kMask: return static_cast<const bool*>(b.sel[t])[j] ? j : -1;
    case kIdx32: return static_cast<const int32_t*>(b.sel[t])[j];
    case kIdx64: return static_cast<const int64_t*>(b.sel[t])[j];
    default: return j;
  }
}

struct AdamwHyper {
  double lr, beta1, beta2, eps, weight_decay, l1;
  bool amsgrad, use_l1;
};

template <typename scalar_t>
__global__ void masked_adamw_kernel(Batch<scalar_t> b, AdamwHyper h, const float* grad_scale, const float* found_inf) {
  using A = acc_t<scalar_t>;
  if (found_inf && *found_inf != 0.f) return;
  const int t = b.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(b.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, b.n[t]);
  const A scale = grad_scale ? static_cast<A>(*grad_scale) : A(1);
  AdamwCoef<A> shared{};
  if (b.step[t]) shared = adamw_coef<A>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.l1, *b.step[t] + A(1), scale);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t pi = position(b, t, j);
    if (pi < 0) continue;
    AdamwCoef<A> c = shared;
    if (b.own[t]) {
      const int32_t count = ++b.own[t][j];
      c = adamw_coef<A>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.l1, static_cast<A>(count), scale);
    }
    A p = b.p[t][pi], m = b.s0[t][j], v = b.s1[t][j];
    A vmax = h.amsgrad ? static_cast<A>(b.s2[t][j]) : A(0);
    const A init = h.use_l1 ? static_cast<A>(b.init[t][j]) : A(0);
    adamw_update(p, static_cast<A>(b.g[t][pi]), m, v, vmax, init, c, h.amsgrad, h.use_l1);
    b.p[t][pi] = static_cast<scalar_t>(p);
    b.s0[t][j] = static_cast<scalar_t>(m);
    b.s1[t][j] = static_cast<scalar_t>(v);
    if (h.amsgrad) b.s2[t][j] = static_cast<scalar_t>(vmax);
  }
}

struct SgdHyper {
  double lr, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, nesterov;
};

template <typename scalar_t>
__global__ void masked_sgd_kernel(Batch<scalar_t> b, SgdHyper h, const float* grad_scale, const float* found_inf) {
  using A = acc_t<scalar_t>;
  if (found_inf && *found_inf != 0.f) return;
  const int t = b.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(b.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, b.n[t]);
  const SgdCoef<A> c{static_cast<A>(h.lr), static_cast<A>(h.momentum), static_cast<A>(h.one_minus_dampening),
                     static_cast<A>(h.weight_decay), grad_scale ? static_cast<A>(*grad_scale) : A(1)};
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t pi = position(b, t, j);
    if (pi < 0) continue;
    const bool first = b.own[t] ? b.own[t][j]++ == 0 : *b.step[t] == 0.f;
    A p = b.p[t][pi];
    A buf = h.use_momentum ? static_cast<A>(b.s0[t][j]) : A(0);
    sgd_update(p, static_cast<A>(b.g[t][pi]), buf, first, c, h.use_momentum, h.nesterov);
    b.p[t][pi] = static_cast<scalar_t>(p);
    if (h.use_momentum) b.s0[t][j] = static_cast<scalar_t>(buf);
  }
}

int8_t kind_of(const std::optional<at::Tensor>& sel) {
  switch (selection_of(sel)) {
    case Selection::Mask: return kMask;
    case Selection::Indices: return sel->scalar_type() == at::kInt ? kIdx32 : kIdx64;
    default: return kAll;
  }
}

template <typename T>
T* ptr_or_null(const at::TensorList& list, size_t i) {
  return list.size() ? list[i].data_ptr<T>() : nullptr;
}

// Packs the params into batches and calls launch(batch, blocks) for each.
template <typename scalar_t, typename Launch>
void for_batches(at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& selectors,
                 at::TensorList s0, at::TensorList s1, at::TensorList s2, at::TensorList steps,
                 const c10::List<std::optional<at::Tensor>>& inits, const Launch& launch) {
  Batch<scalar_t> b{};
  int tensors = 0, blocks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> sel = selectors.get(i);
    const int8_t kind = kind_of(sel);
    const int64_t n = (kind == kIdx32 || kind == kIdx64) ? sel->numel() : params[i].numel();
    if (n == 0) continue;
    if (tensors == kMaxTensors) {
      launch(b, blocks);
      tensors = blocks = 0;
    }
    int slot = tensors++;
    b.p[slot] = params[i].data_ptr<scalar_t>();
    b.g[slot] = grads[i].data_ptr<scalar_t>();
    b.s0[slot] = ptr_or_null<scalar_t>(s0, i);
    b.s1[slot] = ptr_or_null<scalar_t>(s1, i);
    b.s2[slot] = ptr_or_null<scalar_t>(s2, i);
    b.init[slot] = inits.size() ? inits.get(i)->data_ptr<scalar_t>() : nullptr;
    b.sel[slot] = kind == kAll ? nullptr : sel->data_ptr();
    const bool own = steps[i].scalar_type() == at::kInt;
    b.step[slot] = own ? nullptr : steps[i].data_ptr<float>();
    b.own[slot] = own ? steps[i].data_ptr<int32_t>() : nullptr;
    b.n[slot] = n;
    b.kind[slot] = kind;
    for (int64_t c = 0; c < (n + kChunk - 1) / kChunk; ++c) {
      if (blocks == kMaxBlocks) {  // launch what is packed; this tensor carries on from slot 0
        launch(b, blocks);
        blocks = 0;
        b.p[0] = b.p[slot], b.g[0] = b.g[slot], b.s0[0] = b.s0[slot], b.s1[0] = b.s1[slot], b.s2[0] = b.s2[slot];
        b.init[0] = b.init[slot], b.sel[0] = b.sel[slot], b.step[0] = b.step[slot], b.own[0] = b.own[slot];
        b.n[0] = b.n[slot], b.kind[0] = b.kind[slot];
        slot = 0;
        tensors = 1;
      }
      b.block_tensor[blocks] = static_cast<int16_t>(slot);
      b.block_chunk[blocks++] = static_cast<int32_t>(c);
    }
  }
  if (blocks > 0) launch(b, blocks);
}

// Shared counts advance by one unless the step was skipped; per-entry counts advanced in-kernel.
void advance_shared_steps(at::TensorList steps, const std::optional<at::Tensor>& found_inf) {
  std::vector<at::Tensor> shared;
  for (const auto& s : steps)
    if (s.scalar_type() == at::kFloat) shared.push_back(s);
  if (shared.empty()) return;
  const at::Tensor inc = found_inf.has_value() ? found_inf->eq(0).to(at::kFloat).reshape({})
                                               : at::ones({}, shared[0].options());
  for (auto& s : shared) s.add_(inc);
}

const float* float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads,
                       const c10::List<std::optional<at::Tensor>>& selectors, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                       const c10::List<std::optional<at::Tensor>>& inits, double lr, double beta1, double beta2,
                       double eps, double weight_decay, double l1_to_init, bool amsgrad,
                       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "masked_adamw_";
  std::vector<std::pair<const char*, at::TensorList>> states = {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) states.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  const c10::List<std::optional<at::Tensor>> no_inits;
  TORCH_CHECK_VALUE(l1_to_init == 0 || inits.size() == params.size(), op, ": l1_to_init needs one init per param");
  const auto& used_inits = l1_to_init != 0 ? inits : no_inits;
  check_masked_step(op, params, grads, selectors, states, steps, used_inits, grad_scale, found_inf);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const AdamwHyper h{lr, beta1, beta2, eps, weight_decay, l1_to_init, amsgrad, l1_to_init != 0};
  XLS_DISPATCH_FLOATS(params[0].scalar_type(), "masked_adamw_", [&] {
    for_batches<scalar_t>(params, grads, selectors, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : at::TensorList(),
                          steps, used_inits, [&](const Batch<scalar_t>& b, int blocks) {
                            masked_adamw_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                b, h, float_ptr(grad_scale), float_ptr(found_inf));
                            C10_CUDA_KERNEL_LAUNCH_CHECK();
                          });
  });
  advance_shared_steps(steps, found_inf);
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& selectors,
                     at::TensorList momentum_buffers, at::TensorList steps, double lr, double momentum,
                     double dampening, double weight_decay, bool nesterov, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf) {
  const char* op = "masked_sgd_";
  std::vector<std::pair<const char*, at::TensorList>> states;
  if (momentum != 0) states.push_back({"momentum_buffers", momentum_buffers});
  const c10::List<std::optional<at::Tensor>> no_inits;
  check_masked_step(op, params, grads, selectors, states, steps, no_inits, grad_scale, found_inf);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const SgdHyper h{lr, momentum, 1 - dampening, weight_decay, momentum != 0, nesterov};
  XLS_DISPATCH_FLOATS(params[0].scalar_type(), "masked_sgd_", [&] {
    for_batches<scalar_t>(params, grads, selectors, momentum != 0 ? momentum_buffers : at::TensorList(), {}, {}, steps,
                          no_inits, [&](const Batch<scalar_t>& b, int blocks) {
                            masked_sgd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
                                b, h, float_ptr(grad_scale), float_ptr(found_inf));
                            C10_CUDA_KERNEL_LAUNCH_CHECK();
                          });
  });
  advance_shared_steps(steps, found_inf);
}

// --- multi_mask_weight_grad: a [64, 64] tile of dW per block, 256 threads with 4x4 outputs each ---

constexpr int kTile = 64;
constexpr int kTok = 16;

template <typename scalar_t>
__global__ void multi_mask_weight_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                              const bool* __restrict__ masks, const int64_t* __restrict__ order,
                                              const int64_t* __restrict__ offsets, scalar_t* __restrict__ out,
                                              int64_t num_ids, int64_t rows, int64_t cols) {
  using A = acc_t<scalar_t>;
  __shared__ A dy_s[kTok][kTile];
  __shared__ A x_s[kTok][kTile];
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile, i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;  // outputs (o0 + ty*4 + a, i0 + tx*4 + c)
  A acc[4][4] = {};
  for (int64_t lang = 0; lang < num_ids; ++lang) {
    const int64_t start = offsets[lang], end = offsets[lang + 1];
    if (start == end) continue;
    A part[4][4] = {};
    for (int64_t t0 = start; t0 < end; t0 += kTok) {
      // gather kTok tokens' rows of dY and X into shared memory (zeros past the group's end)
      for (int e = threadIdx.x; e < kTok * kTile; e += blockDim.x) {
        const int r = e / kTile, col = e % kTile;
        const bool live = t0 + r < end;
        const int64_t tok = live ? order[t0 + r] : 0;
        dy_s[r][col] = live && o0 + col < rows ? static_cast<A>(dy[tok * rows + o0 + col]) : A(0);
        x_s[r][col] = live && i0 + col < cols ? static_cast<A>(x[tok * cols + i0 + col]) : A(0);
      }
      __syncthreads();
      for (int r = 0; r < kTok; ++r) {
        A a[4], c[4];
        for (int k = 0; k < 4; ++k) a[k] = dy_s[r][ty * 4 + k], c[k] = x_s[r][tx * 4 + k];
        for (int u = 0; u < 4; ++u)
          for (int w = 0; w < 4; ++w) part[u][w] += a[u] * c[w];
      }
      __syncthreads();
    }
    for (int u = 0; u < 4; ++u)
      for (int w = 0; w < 4; ++w) {
        const int64_t o = o0 + ty * 4 + u, i = i0 + tx * 4 + w;
        if (o < rows && i < cols && masks[(lang * rows + o) * cols + i]) acc[u][w] += part[u][w];
      }
  }
  for (int u = 0; u < 4; ++u)
    for (int w = 0; w < 4; ++w) {
      const int64_t o = o0 + ty * 4 + u, i = i0 + tx * 4 + w;
      if (o < rows && i < cols) out[o * cols + i] = static_cast<scalar_t>(acc[u][w]);
    }
}

at::Tensor multi_mask_weight_grad_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& masks,
                                       const at::Tensor& order, const at::Tensor& offsets) {
  check_multi_mask_weight_grad("multi_mask_weight_grad", grad_out, input, masks, order, offsets);
  const int64_t rows = grad_out.size(1), cols = input.size(1);
  auto out = at::empty({rows, cols}, input.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto dy = grad_out.contiguous(), x = input.contiguous(), m = masks.contiguous();
  const auto ord = order.contiguous(), off = offsets.contiguous();
  const dim3 grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  auto stream = c10::cuda::getCurrentCUDAStream();
  XLS_DISPATCH_FLOATS(input.scalar_type(), "multi_mask_weight_grad", [&] {
    multi_mask_weight_grad_kernel<scalar_t><<<grid, 256, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), m.data_ptr<bool>(), ord.data_ptr<int64_t>(),
        off.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), masks.size(0), rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CUDA, m) {
  m.impl("masked_adamw_", &masked_adamw_cuda);
  m.impl("masked_sgd_", &masked_sgd_cuda);
  m.impl("multi_mask_weight_grad", &multi_mask_weight_grad_cuda);
}

}  // namespace xlsparse

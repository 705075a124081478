// CUDA kernels of the matmul family: SDDMM (one warp per delta entry), SpMM (one thread per
// entry and token block, atomics into a wide buffer) and expert-ensemble mixing (one block per
// token). Grids depend on shapes only: each kernel reads its token range from the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "xlsparse/checks.h"
#include "xlsparse/matmul.h"

namespace xlsparse {
namespace {

constexpr int kThreads = 256;
constexpr int kTokensPerThread = 16;

// Token selection as raw pointers: positions [bounds[0], bounds[1]) of index (or of 0..T−1).
template <typename acc>
struct TokenView {
  const int64_t* index;
  const int64_t* bounds;
  const acc* scale;
  int64_t index_len;
  int64_t num_tokens;

  __device__ void range(int64_t& begin, int64_t& end) const {
    begin = 0;
    end = index ? index_len : num_tokens;
    if (bounds) {
      begin = max(int64_t(0), bounds[0]);
      end = min(end, bounds[1]);
    }
  }
  // The token at position j, or −1 when a bad id would read outside the matrices.
  __device__ int64_t at(int64_t j) const {
    const int64_t t = index ? index[j] : j;
    return (t >= 0 && t < num_tokens) ? t : -1;
  }
  __device__ acc scale_of(int64_t t) const { return scale ? scale[t] : acc(1); }
};

template <typename acc>
TokenView<acc> token_view(int64_t num_tokens, const c10::optional<at::Tensor>& token_index,
                          const c10::optional<at::Tensor>& token_bounds, const c10::optional<at::Tensor>& token_scale,
                          at::Tensor& index_c, at::Tensor& bounds_c, at::Tensor& scale_c) {
  TokenView<acc> v{nullptr, nullptr, nullptr, 0, num_tokens};
  if (token_index.has_value()) {
    index_c = token_index->contiguous();
    v.index = index_c.data_ptr<int64_t>();
    v.index_len = index_c.numel();
  }
  if (token_bounds.has_value()) {
    bounds_c = token_bounds->contiguous();
    v.bounds = bounds_c.data_ptr<int64_t>();
  }
  if (token_scale.has_value()) {
    scale_c = token_scale->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    v.scale = scale_c.data_ptr<acc>();
  }
  return v;
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  return v;
}

// Sum (or max) over the block; every thread gets the result.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    const T other = __shfl_down_sync(0xffffffff, v, o);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T r = shared[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) r = kMax ? (shared[w] > r ? shared[w] : r) : r + shared[w];
    shared[0] = r;
  }
  __syncthreads();
  return shared[0];
}

// --- SDDMM ---

template <typename scalar_t, typename index_t>
__global__ void sddmm_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                             const index_t* __restrict__ indices, scalar_t* __restrict__ out, int64_t k, int64_t rows,
                             int64_t cols, TokenView<acc_t<scalar_t>> tok) {
  using acc = acc_t<scalar_t>;
  const int64_t n = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (n >= k) return;
  const int64_t flat = indices[n], r = flat / cols, c = flat % cols;
  int64_t begin, end;
  tok.range(begin, end);
  acc sum = 0;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const int64_t t = tok.at(j);
    if (t < 0) continue;
    sum += tok.scale_of(t) * static_cast<acc>(a[t * rows + r]) * static_cast<acc>(b[t * cols + c]);
  }
  sum = warp_sum(sum);
  if (lane == 0) out[n] = static_cast<scalar_t>(sum);
}

at::Tensor sddmm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                      const c10::optional<at::Tensor>& token_index, const c10::optional<at::Tensor>& token_bounds,
                      const c10::optional<at::Tensor>& token_scale) {
  check_token_matmul("sddmm", a, b, indices, token_index, token_bounds, token_scale);
  const int64_t rows = a.size(1), cols = b.size(1), k = indices.numel();
  check_indices("sddmm", indices, rows * cols);
  check_token_values("sddmm", b.size(0), token_index, token_bounds);
  auto out = at::empty({k}, b.options());
  if (k == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous(), bc = b.contiguous(), idx = indices.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (k * 32 + kThreads - 1) / kThreads;
  XLS_DISPATCH_FLOATS(b.scalar_type(), "sddmm", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor ic, bc_, sc;
    const auto tok = token_view<acc>(b.size(0), token_index, token_bounds, token_scale, ic, bc_, sc);
    XLS_DISPATCH_INDEX(idx.scalar_type(), "sddmm", [&] {
      sddmm_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), out.data_ptr<scalar_t>(), k,
          rows, cols, tok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// --- SpMM ---

template <typename scalar_t, typename index_t, typename wide_t>
__global__ void spmm_kernel(wide_t* __restrict__ target, const scalar_t* __restrict__ x,
                            const index_t* __restrict__ indices, const scalar_t* __restrict__ values, int64_t k,
                            int64_t groups, int64_t xcols, int64_t dcols, bool transpose,
                            TokenView<acc_t<scalar_t>> tok) {
  using acc = acc_t<scalar_t>;
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= k) return;
  const int64_t flat = indices[n];
  const int64_t g = transpose ? flat % dcols : flat / dcols;
  const int64_t other = transpose ? flat / dcols : flat % dcols;
  const acc v = static_cast<acc>(values[n]);
  int64_t begin, end;
  tok.range(begin, end);
  // Token blocks stride by gridDim.y, which is capped at 65535: a batch of more than 65535 blocks
  // (about 1M tokens) still runs whole.
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kTokensPerThread;
  for (int64_t j0 = begin + blockIdx.y * static_cast<int64_t>(kTokensPerThread); j0 < end; j0 += stride) {
    for (int64_t j = j0; j < j0 + kTokensPerThread && j < end; ++j) {
      const int64_t t = tok.at(j);
      if (t < 0) continue;
      atomicAdd(target + t * groups + g,
                static_cast<wide_t>(tok.scale_of(t) * v * static_cast<acc>(x[t * xcols + other])));
    }
  }
}

void spmm_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
               const c10::optional<at::Tensor>& token_index, const c10::optional<at::Tensor>& token_bounds,
               const c10::optional<at::Tensor>& token_scale, bool transpose) {
  check_token_matmul("spmm_", out, x, indices, token_index, token_bounds, token_scale);
  check_spmm(out, x, indices, values);
  const int64_t groups = out.size(1), xcols = x.size(1), k = indices.numel();
  check_indices("spmm_", indices, groups * xcols);
  check_token_values("spmm_", x.size(0), token_index, token_bounds);
  const int64_t index_len = token_index.has_value() ? token_index->numel() : x.size(0);
  if (k == 0 || index_len == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const auto xc = x.contiguous(), idx = indices.contiguous(), val = values.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((k + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>((index_len + kTokensPerThread - 1) / kTokensPerThread, 65535)));
  // The entries' products gather by atomics into a zeroed wide buffer that is added to `out` once,
  // so each output element is rounded once (float64 adds in place).
  const bool wide = out.scalar_type() == at::kDouble;
  auto target = wide ? out : at::zeros(out.sizes(), out.options().dtype(at::kFloat));
  XLS_DISPATCH_FLOATS(x.scalar_type(), "spmm_", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor ic, bc, sc;
    const auto tok = token_view<acc>(x.size(0), token_index, token_bounds, token_scale, ic, bc, sc);
    XLS_DISPATCH_INDEX(idx.scalar_type(), "spmm_", [&] {
      spmm_kernel<scalar_t, index_t, acc><<<grid, kThreads, 0, stream>>>(
          target.data_ptr<acc>(), xc.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), val.data_ptr<scalar_t>(), k,
          groups, xcols, transpose ? groups : xcols, transpose, tok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!wide) {
    // Added where a selected token meets a column that an entry reaches; every other element keeps
    // its bits (−0.0, NaN payloads), as on the CPU. Built on the device: no host sync.
    auto reached = at::zeros({groups}, out.options().dtype(at::kBool));
    const auto flat = idx.to(at::kLong);
    reached.index_fill_(0, transpose ? flat.remainder(groups) : flat.div(xcols, "floor"), true);
    at::Tensor rows = at::ones({x.size(0)}, out.options().dtype(at::kBool));
    if (token_index.has_value()) {
      const auto ti = token_index->to(at::kLong);
      auto live = at::ones({ti.numel()}, out.options().dtype(at::kInt));
      if (token_bounds.has_value()) {
        const auto j = at::arange(ti.numel(), ti.options());
        const auto b = token_bounds->to(ti.device(), at::kLong);
        live = j.ge(b[0]).logical_and(j.lt(b[1])).to(at::kInt);
      }
      rows = at::zeros({x.size(0)}, out.options().dtype(at::kInt)).index_add_(0, ti, live).gt(0);
    }
    const auto keep = rows.unsqueeze(1).logical_and(reached.unsqueeze(0));
    out.copy_(at::where(keep, out.to(at::kFloat).add_(target).to(out.scalar_type()), out));
  }
}

// --- expert-ensemble mixing: one block per token ---

template <typename acc, typename scalar_t>
__device__ acc row_lse(const scalar_t* z, int64_t V, acc* shared) {
  acc m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = max(m, static_cast<acc>(z[v]));
  m = block_reduce<acc, true>(m, shared);
  if (m == -INFINITY) return m;  // a row that bans every class: −inf as torch.logsumexp, not NaN (same m in every thread)
  acc s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += exp(static_cast<acc>(z[v]) - m);
  return m + log(block_reduce<acc, false>(s, shared));
}

template <typename acc, typename scalar_t>
__device__ acc mixed(const scalar_t* z, const acc* w, int64_t E, int64_t T, int64_t V, int64_t t, int64_t v) {
  acc s = 0;
  // an expert of weight 0 (dropped by top-k) adds nothing, even where its logits are ±inf
  for (int64_t e = 0; e < E; ++e) s += times_nonzero(w[e], static_cast<acc>(z[(e * T + t) * V + v]));
  return s;
}

// The prob-space log-mixture of class v of token t, coef_e = lw[t, e] − lse_e: the forward's out
// before rounding, which the backward recomputes rather than read the rounded out.
template <typename acc, typename scalar_t>
__device__ acc prob_mixture_at(const scalar_t* z, const acc* coef, int64_t E, int64_t T, int64_t V, int64_t t, int64_t v) {
  return log_mixture<acc>(E, [&](int64_t e) { return coef[e] + static_cast<acc>(z[(e * T + t) * V + v]); });
}

// Per-token expert weights w_e = exp(lw[t, e]) in shared memory (E <= kMaxExperts).
constexpr int kMaxExperts = 64;

// The logit-space mixture's log-normaliser of token t, log Σ_v exp(Σ_e w_e z_e[v]), with the
// weights w_e = exp(lw[t, e]) written to `coef` (shared) for the caller's own pass over v.
template <typename acc, typename scalar_t>
__device__ acc logit_mixture_lse(const scalar_t* z, const acc* lw, acc* coef, int64_t E, int64_t T, int64_t V, int64_t t,
                                 acc* shared) {
  if (threadIdx.x < E) coef[threadIdx.x] = exp(static_cast<acc>(lw[t * E + threadIdx.x]));
  __syncthreads();
  acc m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) m = max(m, mixed(z, coef, E, T, V, t, v));
  m = block_reduce<acc, true>(m, shared);
  acc s = 0;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) s += exp(mixed(z, coef, E, T, V, t, v) - m);
  return m + log(block_reduce<acc, false>(s, shared));
}

template <typename scalar_t>
__global__ void logprobs_kernel(const scalar_t* __restrict__ z, const acc_t<scalar_t>* __restrict__ lw,
                                scalar_t* __restrict__ out,
                                acc_t<scalar_t>* __restrict__ lse, int64_t E, int64_t T, int64_t V, bool prob) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[32];
  __shared__ acc coef[kMaxExperts];
  const int64_t t = blockIdx.x;
  if (prob) {
    for (int64_t e = 0; e < E; ++e) {
      const acc l = row_lse<acc>(z + (e * T + t) * V, V, shared);
      if (threadIdx.x == 0) {
        lse[e * T + t] = l;
        coef[e] = static_cast<acc>(lw[t * E + e]) - l;
      }
    }
    __syncthreads();
    // log Σ_e exp(coef_e + z_e[v]) (log_mixture in matmul.h: −inf, not NaN, where every expert bans v)
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
      out[t * V + v] = static_cast<scalar_t>(prob_mixture_at(z, coef, E, T, V, t, v));
  } else {
    const acc l = logit_mixture_lse(z, lw, coef, E, T, V, t, shared);
    if (threadIdx.x == 0) lse[t] = l;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) out[t * V + v] = static_cast<scalar_t>(mixed(z, coef, E, T, V, t, v) - l);
  }
}

// `out` is not read: rounded to the logits' dtype (bf16 near −10: a 0.0625 grid) it put the posterior
// and the softmax ~1% off. Each pass over the classes recomputes the forward's log-probs in acc from
// every expert's logit at v, so one pass serves all experts: per-thread sums for each expert.
template <typename scalar_t>
__global__ void logprobs_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ z,
                                         const acc_t<scalar_t>* __restrict__ lw,
                                         const acc_t<scalar_t>* __restrict__ lse, scalar_t* __restrict__ dz,
                                         acc_t<scalar_t>* __restrict__ dlw, int64_t E, int64_t T, int64_t V, bool prob) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[32];
  __shared__ acc coef[kMaxExperts];   // prob: lw_e − lse_e, as the forward; logit: w_e = exp(lw_e)
  __shared__ acc lse_e[kMaxExperts];  // prob: each expert's saved lse
  acc S[kMaxExperts];                 // this thread's share of each expert's sum over v
  const int64_t t = blockIdx.x;
  const scalar_t* gr = g + t * V;
  for (int64_t e = 0; e < E; ++e) S[e] = 0;
  if (prob) {
    if (threadIdx.x < E) {
      lse_e[threadIdx.x] = lse[threadIdx.x * T + t];
      coef[threadIdx.x] = static_cast<acc>(lw[t * E + threadIdx.x]) - lse[threadIdx.x * T + t];
    }
    __syncthreads();
    // S_e = Σ_v g · posterior of expert e; a class every expert bans has posterior 0 (out_for_posterior)
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const acc o = out_for_posterior(prob_mixture_at(z, coef, E, T, V, t, v));
      const acc gv = static_cast<acc>(gr[v]);
      for (int64_t e = 0; e < E; ++e) S[e] += gv * exp(static_cast<acc>(z[(e * T + t) * V + v]) + coef[e] - o);
    }
    for (int64_t e = 0; e < E; ++e) S[e] = block_reduce<acc, false>(S[e], shared);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const acc o = out_for_posterior(prob_mixture_at(z, coef, E, T, V, t, v));
      const acc gv = static_cast<acc>(gr[v]);
      for (int64_t e = 0; e < E; ++e) {
        const acc zv = static_cast<acc>(z[(e * T + t) * V + v]);
        dz[(e * T + t) * V + v] = static_cast<scalar_t>(gv * exp(zv + coef[e] - o) - exp(zv - lse_e[e]) * S[e]);
      }
    }
    if (threadIdx.x == 0)
      for (int64_t e = 0; e < E; ++e) dlw[t * E + e] = S[e];
  } else {
    if (threadIdx.x < E) coef[threadIdx.x] = exp(static_cast<acc>(lw[t * E + threadIdx.x]));
    __syncthreads();
    const acc l = lse[t];
    acc G = 0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) G += static_cast<acc>(gr[v]);
    G = block_reduce<acc, false>(G, shared);
    // S_e = Σ_v d · z_e: the gradient of the mixed logits d = g − softmax(zbar) G, with the forward's
    // log-probs recomputed as zbar − lse
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const acc d = static_cast<acc>(gr[v]) - exp(mixed(z, coef, E, T, V, t, v) - l) * G;
      for (int64_t e = 0; e < E; ++e) {
        S[e] += times_nonzero(d, static_cast<acc>(z[(e * T + t) * V + v]));
        dz[(e * T + t) * V + v] = static_cast<scalar_t>(coef[e] * d);
      }
    }
    for (int64_t e = 0; e < E; ++e) S[e] = block_reduce<acc, false>(S[e], shared);
    if (threadIdx.x == 0)
      for (int64_t e = 0; e < E; ++e) dlw[t * E + e] = times_nonzero(coef[e], S[e]);
  }
}

template <typename scalar_t>
__global__ void nll_kernel(const scalar_t* __restrict__ z, const acc_t<scalar_t>* __restrict__ lw,
                           const int64_t* __restrict__ y, acc_t<scalar_t>* __restrict__ nll,
                           acc_t<scalar_t>* __restrict__ lse, int64_t E, int64_t T, int64_t V, bool prob) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[32];
  __shared__ acc coef[kMaxExperts];
  const int64_t t = blockIdx.x, target = y[t];
  if (prob) {
    acc mix = -INFINITY;
    for (int64_t e = 0; e < E; ++e) {
      const acc l = row_lse<acc>(z + (e * T + t) * V, V, shared);
      if (threadIdx.x == 0) lse[e * T + t] = l;
      mix = log_add_exp(mix, static_cast<acc>(lw[t * E + e]) + static_cast<acc>(z[(e * T + t) * V + target]) - l);
    }
    if (threadIdx.x == 0) nll[t] = -mix;
  } else {
    const acc l = logit_mixture_lse(z, lw, coef, E, T, V, t, shared);
    if (threadIdx.x == 0) {
      lse[t] = l;
      nll[t] = l - mixed(z, coef, E, T, V, t, target);
    }
  }
}

template <typename scalar_t>
__global__ void nll_backward_kernel(const acc_t<scalar_t>* __restrict__ g, const scalar_t* __restrict__ z,
                                    const acc_t<scalar_t>* __restrict__ lw, const int64_t* __restrict__ y,
                                    const acc_t<scalar_t>* __restrict__ nll, const acc_t<scalar_t>* __restrict__ lse,
                                    scalar_t* __restrict__ dz, acc_t<scalar_t>* __restrict__ dlw, int64_t E, int64_t T,
                                    int64_t V, bool prob) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[32];
  __shared__ acc coef[kMaxExperts];
  const int64_t t = blockIdx.x, target = y[t];
  const acc gt = g[t];
  if (prob) {
    for (int64_t e = 0; e < E; ++e) {
      const scalar_t* zr = z + (e * T + t) * V;
      const acc l = lse[e * T + t];
      // posterior of expert e for the target; d nll / d z_e = post_e (softmax(z_e) − onehot)
      const acc post =
          exp(static_cast<acc>(lw[t * E + e]) + static_cast<acc>(zr[target]) - l + nll_for_posterior(nll[t]));
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
        dz[(e * T + t) * V + v] = static_cast<scalar_t>(gt * post * (exp(static_cast<acc>(zr[v]) - l) - (v == target ? 1 : 0)));
      if (threadIdx.x == 0) dlw[t * E + e] = -gt * post;
    }
  } else {
    if (threadIdx.x < E) coef[threadIdx.x] = exp(static_cast<acc>(lw[t * E + threadIdx.x]));
    __syncthreads();
    const acc l = lse[t];
    for (int64_t e = 0; e < E; ++e) {
      const scalar_t* zr = z + (e * T + t) * V;
      acc dot = 0;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const acc d = gt * (exp(mixed(z, coef, E, T, V, t, v) - l) - (v == target ? 1 : 0));  // d nll / d zbar
        dot += times_nonzero(d, static_cast<acc>(zr[v]));
        dz[(e * T + t) * V + v] = static_cast<scalar_t>(coef[e] * d);
      }
      dot = block_reduce<acc, false>(dot, shared);
      if (threadIdx.x == 0) dlw[t * E + e] = times_nonzero(coef[e], dot);
    }
  }
}

void check_experts(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.size(0) <= kMaxExperts, op, ": the CUDA kernel takes at most ", kMaxExperts,
                    " experts, got ", logits.size(0));
}

std::tuple<at::Tensor, at::Tensor> ensemble_logprobs_cuda(const at::Tensor& logits, const at::Tensor& log_weights,
                                                          bool prob_space) {
  check_ensemble("ensemble_logprobs", logits, log_weights, nullptr);
  check_experts("ensemble_logprobs", logits);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  auto out = at::empty({T, V}, logits.options());
  auto lse = at::empty({prob_space ? E : 1, T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return std::make_tuple(out, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto lw = log_weights.to(acc_dtype(logits.scalar_type())).contiguous();
  const auto z = logits.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_logprobs", [&] {
    logprobs_kernel<scalar_t><<<T, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), lw.data_ptr<acc_t<scalar_t>>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t<scalar_t>>(), E, T,
        V, prob_space);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(out, lse);
}

std::tuple<at::Tensor, at::Tensor> ensemble_logprobs_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                                   const at::Tensor& log_weights, const at::Tensor& out,
                                                                   const at::Tensor& lse, bool prob_space) {
  check_ensemble("ensemble_logprobs_backward", logits, log_weights, nullptr);
  check_experts("ensemble_logprobs_backward", logits);  // per-expert sums in shared memory and registers
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_ensemble_saved("ensemble_logprobs_backward", logits, grad, out, lse, prob_space, false);
  auto dz = at::empty({E, T, V}, logits.options());
  // the gradient in the accumulation dtype, handed back in log_weights' own
  auto dlw = at::empty({T, E}, log_weights.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return std::make_tuple(dz, dlw.to(log_weights.scalar_type()));
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto lw = log_weights.to(acc_dtype(logits.scalar_type())).contiguous();
  // out is checked (shape, dtype) but not read: the kernel recomputes it in the accumulation dtype
  const auto g = grad.contiguous(), z = logits.contiguous(), l = lse.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_logprobs_backward", [&] {
    logprobs_backward_kernel<scalar_t><<<T, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), lw.data_ptr<acc_t<scalar_t>>(), l.data_ptr<acc_t<scalar_t>>(),
        dz.data_ptr<scalar_t>(), dlw.data_ptr<acc_t<scalar_t>>(), E, T, V, prob_space);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(dz, dlw.to(log_weights.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> ensemble_nll_cuda(const at::Tensor& logits, const at::Tensor& log_weights,
                                                     const at::Tensor& targets, bool prob_space) {
  check_ensemble("ensemble_nll", logits, log_weights, &targets);
  check_experts("ensemble_nll", logits);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_targets("ensemble_nll", targets, V);
  // nll in the accumulation dtype, like lse: the prob-space backward's posterior reads it
  auto nll = at::empty({T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  auto lse = at::empty({prob_space ? E : 1, T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return std::make_tuple(nll, lse);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto lw = log_weights.to(acc_dtype(logits.scalar_type())).contiguous();
  const auto z = logits.contiguous(), y = targets.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_nll", [&] {
    nll_kernel<scalar_t><<<T, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), lw.data_ptr<acc_t<scalar_t>>(), y.data_ptr<int64_t>(), nll.data_ptr<acc_t<scalar_t>>(),
        lse.data_ptr<acc_t<scalar_t>>(), E, T, V, prob_space);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(nll, lse);
}

std::tuple<at::Tensor, at::Tensor> ensemble_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                              const at::Tensor& log_weights, const at::Tensor& targets,
                                                              const at::Tensor& nll, const at::Tensor& lse,
                                                              bool prob_space) {
  check_ensemble("ensemble_nll_backward", logits, log_weights, &targets);
  check_experts("ensemble_nll_backward", logits);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_ensemble_saved("ensemble_nll_backward", logits, grad, nll, lse, prob_space, true);
  check_targets("ensemble_nll_backward", targets, V);
  auto dz = at::empty({E, T, V}, logits.options());
  // the gradient in the accumulation dtype, handed back in log_weights' own
  auto dlw = at::empty({T, E}, log_weights.options().dtype(acc_dtype(logits.scalar_type())));
  if (T == 0) return std::make_tuple(dz, dlw.to(log_weights.scalar_type()));
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto lw = log_weights.to(acc_dtype(logits.scalar_type())).contiguous();
  const auto g = grad.contiguous(), z = logits.contiguous(), y = targets.contiguous(),
             n = nll.contiguous(), l = lse.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_nll_backward", [&] {
    nll_backward_kernel<scalar_t><<<T, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<acc_t<scalar_t>>(), z.data_ptr<scalar_t>(), lw.data_ptr<acc_t<scalar_t>>(), y.data_ptr<int64_t>(),
        n.data_ptr<acc_t<scalar_t>>(), l.data_ptr<acc_t<scalar_t>>(), dz.data_ptr<scalar_t>(),
        dlw.data_ptr<acc_t<scalar_t>>(), E, T, V, prob_space);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(dz, dlw.to(log_weights.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CUDA, m) {
  m.impl("sddmm", &sddmm_cuda);
  m.impl("spmm_", &spmm_cuda);
  m.impl("ensemble_logprobs", &ensemble_logprobs_cuda);
  m.impl("ensemble_logprobs_backward", &ensemble_logprobs_backward_cuda);
  m.impl("ensemble_nll", &ensemble_nll_cuda);
  m.impl("ensemble_nll_backward", &ensemble_nll_backward_cuda);
}

}  // namespace xlsparse

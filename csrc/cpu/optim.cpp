// CPU kernels of the optim family: the masked AdamW/SGD steps and multi_mask_weight_grad.
//
// A step runs the state entries of all parameters in one at::parallel_for, an equal share per
// thread (the CPU form of a multi-tensor launch). float32 tensors with one step
// count per tensor take the at::vec loops of vec/optim_vec.cpp (all entries, a bool mask, or int32
// indices), compiled per CPU capability; other dtypes, int64 indices and per-entry step counts run the same header math one
// entry at a time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xlsparse/cpu_kernels.h"
#include "xlsparse/masked_add.h"

namespace xlsparse {

namespace {

constexpr int64_t kGrain = 1 << 14;  // fewer entries than this run on one thread
// One parameter of a step: its pointers and which entries the step touches.
template <typename scalar_t>
struct Param {
  scalar_t* p;
  const scalar_t* g;
  scalar_t* s0;  // exp_avg / momentum buffer
  scalar_t* s1;  // exp_avg_sq
  scalar_t* s2;  // max_exp_avg_sq
  const scalar_t* init;
  Selection sel;
  const bool* mask;
  at::Tensor indices;
  int64_t n;         // state entries: K for indices, numel otherwise
  float* step;       // one count for the tensor, or
  int32_t* own_step; // one count per state entry
};

template <typename scalar_t>
Param<scalar_t> param_at(size_t i, const at::TensorList& params, const at::TensorList& grads,
                         const c10::List<std::optional<at::Tensor>>& selectors, const at::TensorList& s0,
                         const at::TensorList& s1, const at::TensorList& s2, const at::TensorList& steps,
                         const c10::List<std::optional<at::Tensor>>& inits) {
  Param<scalar_t> q{};
  q.p = params[i].data_ptr<scalar_t>();
  q.g = grads[i].data_ptr<scalar_t>();
  q.s0 = s0.size() ? s0[i].data_ptr<scalar_t>() : nullptr;
  q.s1 = s1.size() ? s1[i].data_ptr<scalar_t>() : nullptr;
  q.s2 = s2.size() ? s2[i].data_ptr<scalar_t>() : nullptr;
  q.init = inits.size() ? inits.get(i)->data_ptr<scalar_t>() : nullptr;
  const std::optional<at::Tensor> sel = selectors.get(i);
  q.sel = selection_of(sel);
  q.mask = q.sel == Selection::Mask ? sel->data_ptr<bool>() : nullptr;
  if (q.sel == Selection::Indices) q.indices = *sel;
  q.n = q.sel == Selection::Indices ? sel->numel() : params[i].numel();
  if (steps[i].scalar_type() == at::kInt) {
    q.own_step = steps[i].data_ptr<int32_t>();
  } else {
    q.step = steps[i].data_ptr<float>();
  }
  return q;
}

// Calls f(param_index, state_index) for every selected entry with state index in [begin, end).
template <typename scalar_t, typename F>
void for_selected(const Param<scalar_t>& q, int64_t begin, int64_t end, const F& f) {
  switch (q.sel) {
    case Selection::All:
      for (int64_t j = begin; j < end; ++j) f(j, j);
      break;
    case Selection::Mask:
      for (int64_t j = begin; j < end; ++j)
        if (q.mask[j]) f(j, j);
      break;
    case Selection::Indices:
      XLS_DISPATCH_INDEX(q.indices.scalar_type(), "masked step", [&] {
        const index_t* idx = q.indices.template data_ptr<index_t>();
        for (int64_t j = begin; j < end; ++j) f(static_cast<int64_t>(idx[j]), j);
      });
      break;
  }
}

// Runs body(param, begin, end) over every parameter's state entries in one parallel loop, each
// thread taking an equal share of all entries (a contiguous run of the parameters laid end to end).
// Parallel items of one parameter each (at most 32768 entries) split 65 XLM-R tensors' entries
// 44%/56% between 2 threads at 1%: the compact step waited on the larger half.
template <typename scalar_t, typename Body>
void run_chunks(const std::vector<Param<scalar_t>>& qs, const Body& body) {
  std::vector<int64_t> start(qs.size() + 1, 0);  // start[i]: param i's first entry in the concatenation
  for (size_t i = 0; i < qs.size(); ++i) start[i + 1] = start[i] + qs[i].n;
  at::parallel_for(0, start.back(), kGrain, [&](int64_t b, int64_t e) {
    size_t i = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    for (; i < qs.size() && start[i] < e; ++i) {
      const int64_t lo = std::max(b, start[i]) - start[i], hi = std::min(e, start[i + 1]) - start[i];
      if (lo < hi) body(qs[i], lo, hi);
    }
  });
}

bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.f;
}

float scale_of(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() ? grad_scale->item<float>() : 1.f;
}

// --- AdamW ---

struct AdamwArgs {
  double lr, beta1, beta2, eps, weight_decay, l1;
  bool amsgrad;
  float grad_scale;
};

template <typename scalar_t>
void adamw_scalar(const Param<scalar_t>& q, int64_t begin, int64_t end, const AdamwArgs& a) {
  using A = acc_t<scalar_t>;
  const bool l1 = q.init != nullptr;
  AdamwCoef<A> shared{};
  if (!q.own_step)
    shared = adamw_coef<A>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.l1, static_cast<A>(*q.step + 1),
                           static_cast<A>(a.grad_scale));
  for_selected(q, begin, end, [&](int64_t pi, int64_t si) {
    AdamwCoef<A> c = shared;
    if (q.own_step) {
      q.own_step[si] += 1;
      c = adamw_coef<A>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.l1, static_cast<A>(q.own_step[si]),
                        static_cast<A>(a.grad_scale));
    }
    A p = q.p[pi], m = q.s0[si], v = q.s1[si];
    A vmax = a.amsgrad ? static_cast<A>(q.s2[si]) : A(0);
    const A init = l1 ? static_cast<A>(q.init[si]) : A(0);
    adamw_update(p, static_cast<A>(q.g[pi]), m, v, vmax, init, c, a.amsgrad, l1);
    q.p[pi] = static_cast<scalar_t>(p);
    q.s0[si] = static_cast<scalar_t>(m);
    q.s1[si] = static_cast<scalar_t>(v);
    if (a.amsgrad) q.s2[si] = static_cast<scalar_t>(vmax);
  });
}

// The at::vec path exists for float32 only.
template <typename scalar_t>
bool adamw_vec(const Param<scalar_t>&, int64_t, int64_t, const AdamwArgs&) {
  return false;
}

FloatJob float_job(const Param<float>& q) {
  return {q.p, q.g, q.s0, q.s1, q.s2, q.init, q.mask};
}

// float32 with one step count: kV entries at a time for all entries, a bool mask, or int32 indices.
// False when it does not apply.
bool adamw_vec(const Param<float>& q, int64_t begin, int64_t end, const AdamwArgs& a) {
  const bool idx32 = q.sel == Selection::Indices && q.indices.scalar_type() == at::kInt;
  if (q.own_step || (q.sel == Selection::Indices && !idx32)) return false;
  const auto c = adamw_coef<float>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.l1, *q.step + 1.f,
                                   a.grad_scale);
  const auto& k = optim_kernels();
  const int64_t j = idx32 ? k.adamw_compact(float_job(q), q.indices.data_ptr<int32_t>(), begin, end, c, a.amsgrad)
                          : k.adamw(float_job(q), begin, end, c, a.amsgrad);
  if (j < end) adamw_scalar(q, j, end, a);
  return true;
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& selectors,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      at::TensorList steps, const c10::List<std::optional<at::Tensor>>& inits, double lr,
                      double beta1, double beta2, double eps, double weight_decay, double l1_to_init, bool amsgrad,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "masked_adamw_";
  std::vector<std::pair<const char*, at::TensorList>> states = {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) states.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  TORCH_CHECK_VALUE(l1_to_init == 0 || inits.size() == params.size(), op, ": l1_to_init needs one init per param");
  check_masked_step(op, params, grads, selectors, states, steps, l1_to_init != 0 ? inits : c10::List<std::optional<at::Tensor>>(),
                    grad_scale, found_inf);
  if (params.empty() || skip_step(found_inf)) return;
  const AdamwArgs a{lr, beta1, beta2, eps, weight_decay, l1_to_init, amsgrad, scale_of(grad_scale)};
  XLS_DISPATCH_FLOATS(params[0].scalar_type(), "masked_adamw_", [&] {
    std::vector<Param<scalar_t>> qs;
    for (size_t i = 0; i < params.size(); ++i)
      qs.push_back(param_at<scalar_t>(i, params, grads, selectors, exp_avgs, exp_avg_sqs,
                                      amsgrad ? max_exp_avg_sqs : at::TensorList(), steps,
                                      l1_to_init != 0 ? inits : c10::List<std::optional<at::Tensor>>()));
    run_chunks(qs, [&](const Param<scalar_t>& q, int64_t b, int64_t e) {
      if (!adamw_vec(q, b, e, a)) adamw_scalar(q, b, e, a);
    });
    for (const auto& q : qs)
      if (q.step) *q.step += 1.f;
  });
}

// --- SGD ---

struct SgdArgs {
  SgdCoef<double> c;
  bool momentum, nesterov;
};

template <typename scalar_t>
void sgd_scalar(const Param<scalar_t>& q, int64_t begin, int64_t end, const SgdArgs& a) {
  using A = acc_t<scalar_t>;
  const SgdCoef<A> c{static_cast<A>(a.c.lr), static_cast<A>(a.c.momentum), static_cast<A>(a.c.one_minus_dampening),
                     static_cast<A>(a.c.weight_decay), static_cast<A>(a.c.grad_scale)};
  for_selected(q, begin, end, [&](int64_t pi, int64_t si) {
    const bool first = q.own_step ? q.own_step[si]++ == 0 : *q.step == 0.f;
    A p = q.p[pi];
    A buf = a.momentum ? static_cast<A>(q.s0[si]) : A(0);
    sgd_update(p, static_cast<A>(q.g[pi]), buf, first, c, a.momentum, a.nesterov);
    q.p[pi] = static_cast<scalar_t>(p);
    if (a.momentum) q.s0[si] = static_cast<scalar_t>(buf);
  });
}

template <typename scalar_t>
bool sgd_vec(const Param<scalar_t>&, int64_t, int64_t, const SgdArgs&) {
  return false;
}

bool sgd_vec(const Param<float>& q, int64_t begin, int64_t end, const SgdArgs& a) {
  if (q.own_step || q.sel == Selection::Indices) return false;
  const SgdCoef<float> c{static_cast<float>(a.c.lr), static_cast<float>(a.c.momentum),
                         static_cast<float>(a.c.one_minus_dampening), static_cast<float>(a.c.weight_decay),
                         static_cast<float>(a.c.grad_scale)};
  const int64_t j = optim_kernels().sgd(float_job(q), begin, end, c, *q.step == 0.f, a.momentum, a.nesterov);
  if (j < end) sgd_scalar(q, j, end, a);
  return true;
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& selectors,
                    at::TensorList momentum_buffers, at::TensorList steps, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const char* op = "masked_sgd_";
  std::vector<std::pair<const char*, at::TensorList>> states;
  if (momentum != 0) states.push_back({"momentum_buffers", momentum_buffers});
  check_masked_step(op, params, grads, selectors, states, steps, c10::List<std::optional<at::Tensor>>(), grad_scale,
                    found_inf);
  if (params.empty() || skip_step(found_inf)) return;
  const SgdArgs a{{lr, momentum, 1 - dampening, weight_decay, scale_of(grad_scale)}, momentum != 0, nesterov};
  XLS_DISPATCH_FLOATS(params[0].scalar_type(), "masked_sgd_", [&] {
    std::vector<Param<scalar_t>> qs;
    for (size_t i = 0; i < params.size(); ++i)
      qs.push_back(param_at<scalar_t>(i, params, grads, selectors, a.momentum ? momentum_buffers : at::TensorList(),
                                      {}, {}, steps, c10::List<std::optional<at::Tensor>>()));
    run_chunks(qs, [&](const Param<scalar_t>& q, int64_t b, int64_t e) {
      if (!sgd_vec(q, b, e, a)) sgd_scalar(q, b, e, a);
    });
    for (const auto& q : qs)
      if (q.step) *q.step += 1.f;
  });
}

// --- multi_mask_weight_grad ---

constexpr int64_t kChunkEntries = 1 << 21;  // at most this many input entries gathered at a time (8 MiB in fp32)
constexpr int64_t kBandEntries = 1 << 20;   // at most this many entries in one band of dW (4 MiB in fp32)

// dW = sum_l M_l * (dY_l^T X_l). Tokens are taken in `order` (grouped by language) a chunk at a
// time; per chunk, one parallel loop over bands of dW rows. A band visits every language's piece
// of the chunk: the piece's product (a single-threaded BLAS call) lands in a buffer that is added
// under that language's mask into the band while both are in cache. So dW goes to memory once per
// chunk, not once per language (4 languages at 4096x1024: 16 MiB written instead of 128 MiB read
// and written), and no dense per-language gradient ever exists. The mask sum is linear, so
// adding piece by piece is exact math. Few parallel regions matter: on a busy machine each one
// costs a scheduler wake-up. Bands are few and large because the BLAS packs the chunk's X piece
// again in every band's call: 1024-row bands instead of 256 at 4096x1024, 4 languages, ran at
// 0.96x the speed of a dense dY^T X instead of 0.91x (an ad-hoc A/B on a Zen 4, one thread, CPU
// time, 3 alternating runs, while other jobs ran; not a benchmarks/ row). Bands small enough
// for L2 (128 rows) need the chunk's X piece packed once per language, not per call: MKL's
// packed-B GEMM (cblas_sgemm_pack/compute) did that, but its calls alone, before any masking,
// ran at 0.94x a dense dY^T X, where this op ran at 0.90x (T = 2048, 4096x1024, 4 languages,
// one thread, Xeon, 7 alternating runs): not worth a second BLAS entry point.
at::Tensor multi_mask_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& masks,
                                      const at::Tensor& order, const at::Tensor& offsets) {
  const char* op = "multi_mask_weight_grad";
  const auto off_t = offsets.contiguous();
  check_multi_mask_weight_grad(op, grad_out, input, masks, order, off_t);
  const int64_t num_ids = masks.size(0), rows = grad_out.size(1), cols = input.size(1);
  const int64_t* off = off_t.data_ptr<int64_t>();
  // the languages' token ranges tile [off[0], off[L]) of `order`; the tokens outside are unrouted
  const int64_t first_token = off[0], end_token = off[num_ids], tokens_total = end_token - first_token;
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // uninitialised: each band's first piece overwrites it (16 MiB not zeroed and read again at
  // 4096x1024); without routed tokens there is no piece
  auto dw = tokens_total ? at::empty({rows, cols}, input.options().dtype(acc))
                         : at::zeros({rows, cols}, input.options().dtype(acc));
  const auto mask = masks.contiguous();
  // two bands per thread (parallel_for splits them evenly), at least 16 rows each, at most
  // kBandEntries entries
  const int64_t per_thread = (rows + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t band = std::max<int64_t>(16, std::min(per_thread, kBandEntries / std::max<int64_t>(cols, 1)));
  const int64_t num_bands = (rows + band - 1) / band;
  // equal chunks of at least 256 tokens, so that the last one is not a sliver
  const int64_t max_chunk = std::max<int64_t>(256, kChunkEntries / std::max<int64_t>(cols, 1));
  const int64_t pieces = (tokens_total + max_chunk - 1) / max_chunk;
  const int64_t chunk = pieces ? (tokens_total + pieces - 1) / pieces : 1;
  AT_DISPATCH_FLOATING_TYPES(acc, "multi_mask_weight_grad", [&] {
    for (int64_t c0 = first_token; c0 < end_token; c0 += chunk) {
      const int64_t c1 = std::min(c0 + chunk, end_token);
      const auto x = input.index_select(0, order.slice(0, c0, c1)).to(acc);
      at::parallel_for(0, num_bands, 1, [&](int64_t b0, int64_t b1) {
        auto part = at::empty({band, cols}, x.options());
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * band, r1 = std::min(rows, r0 + band);
          auto out = part.slice(0, 0, r1 - r0);
          bool written = c0 > first_token;  // every chunk holds some language's tokens
          for (int64_t l = 0; l < num_ids; ++l) {
            const int64_t t0 = std::max(off[l], c0), t1 = std::min(off[l + 1], c1);
            if (t0 >= t1) continue;
            const auto dy = grad_out.slice(1, r0, r1).index_select(0, order.slice(0, t0, t1)).to(acc);
            at::mm_out(out, dy.t(), x.slice(0, t0 - c0, t1 - c0));
            masked_add(dw.data_ptr<scalar_t>() + r0 * cols, out.data_ptr<scalar_t>(),
                       mask.data_ptr<bool>() + (l * rows + r0) * cols, 0, (r1 - r0) * cols, !written);
            written = true;
          }
        }
      });
    }
  });
  return dw.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CPU, m) {
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("masked_sgd_", &masked_sgd_cpu);
  m.impl("multi_mask_weight_grad", &multi_mask_weight_grad_cpu);
}

}  // namespace xlsparse

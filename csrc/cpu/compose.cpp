// CPU kernels of the compose family.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

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

// Scattered accesses to a large tensor miss the caches on nearly every index; asking for the
// line kPrefetch indices ahead keeps several misses in flight.
constexpr int64_t kPrefetch = 16;

// --- union walks over sorted index lists ---

// The part of one sorted index list that falls in [lo, hi): positions pos..end.
template <typename index_t>
struct Span {
  const index_t* idx;
  int64_t pos, end;
  bool at(int64_t j) const { return pos < end && idx[pos] == j; }
};

template <typename index_t>
Span<index_t> span_in(const index_t* idx, int64_t k, int64_t lo, int64_t hi) {
  const index_t* b = std::lower_bound(idx, idx + k, lo, [](index_t a, int64_t v) { return a < v; });
  const index_t* e = std::lower_bound(b, idx + k, hi, [](index_t a, int64_t v) { return a < v; });
  return {idx, b - idx, e - idx};
}

// Calls visit(j) for each distinct index of the union of the spans, in increasing order; visit
// consumes (advances) every span that holds j.
template <typename index_t, typename Visit>
void walk_union(std::vector<Span<index_t>>& spans, Visit visit) {
  for (;;) {
    int64_t j = std::numeric_limits<int64_t>::max();
    for (const auto& s : spans)
      if (s.pos < s.end) j = std::min<int64_t>(j, s.idx[s.pos]);
    if (j == std::numeric_limits<int64_t>::max()) return;
    visit(j);
  }
}

// The sorted union of the spans and, per union index, sum_g alpha[g] * v[g] over the spans that
// hold it (in span order, from zero); where[g][i] is the union position of span g's i-th index.
// Written with selects rather than branches: which span holds the next index is unpredictable.
// Every span must be non-empty. Returns the union's size.
template <typename scalar_t, typename index_t>
int64_t union_shares(std::vector<Span<index_t>>& spans, const std::vector<const scalar_t*>& v,
                     const std::vector<acc_t<scalar_t>>& alpha, int64_t* union_idx, acc_t<scalar_t>* shares,
                     std::vector<std::vector<int64_t>>& where) {
  using a_t = acc_t<scalar_t>;
  constexpr int64_t kDone = std::numeric_limits<int64_t>::max();
  const size_t n = spans.size();
  std::vector<int64_t> cur(n), first(n);
  auto head = [&](size_t g) {
    const auto& s = spans[g];
    return s.pos < s.end ? static_cast<int64_t>(s.idx[s.pos]) : kDone;
  };
  for (size_t g = 0; g < n; ++g) {
    cur[g] = head(g);
    first[g] = spans[g].pos;
  }
  int64_t u = 0;
  for (;; ++u) {
    int64_t j = kDone;
    for (size_t g = 0; g < n; ++g) j = std::min(j, cur[g]);
    if (j == kDone) return u;
    a_t acc = 0;
    for (size_t g = 0; g < n; ++g) {
      const bool hit = cur[g] == j;
      const int64_t at = hit ? spans[g].pos : first[g];
      const a_t next = axpy_acc(acc, v[g][at], alpha[g]);
      acc = hit ? next : acc;
      // A miss rewrites where[g][0] with its own value.
      where[g][at - first[g]] = hit ? u : where[g][at - first[g]];
      spans[g].pos += hit;
      // Peek at the next index without reading past the span's end.
      const auto& s = spans[g];
      const int64_t peek = s.idx[std::min(s.pos, s.end - 1)];
      cur[g] = hit ? (s.pos < s.end ? peek : kDone) : cur[g];
    }
    union_idx[u] = j;
    shares[u] = acc;
  }
}

// [lo, hi) ranges of a tensor of `numel` elements, each holding about kWork of `total` entries.
constexpr int64_t kWork = 1 << 13;
std::vector<std::pair<int64_t, int64_t>> index_ranges(int64_t numel, int64_t total) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(numel, total / kWork));
  const int64_t step = (numel + parts - 1) / parts;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t lo = 0; lo < numel; lo += step) out.emplace_back(lo, std::min(numel, lo + step));
  return out;
}

// --- apply_diffs_ / restore_diffs_ ---

// Every entry's indices sorted, unique and inside its tensor, in one parallel pass over all
// entries (one pass per entry would start hundreds of parallel regions for a model).
void check_entry_indices(const char* op, at::TensorList dense, const std::vector<at::Tensor>& idx,
                         at::IntArrayRef target) {
  constexpr int64_t kChunk = 1 << 16;
  struct Item { int64_t e, begin, end; };
  std::vector<Item> items;
  for (int64_t e = 0; e < static_cast<int64_t>(idx.size()); ++e)
    for (int64_t b = 0; b < idx[e].numel(); b += kChunk) items.push_back({e, b, std::min(idx[e].numel(), b + kChunk)});
  std::vector<int64_t> bad(items.size(), -1);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const Item& it = items[w];
      const int64_t numel = dense[target[it.e]].numel();
      XLS_DISPATCH_INDEX(idx[it.e].scalar_type(), "apply_diffs_", [&] {
        bad[w] = first_bad_index(idx[it.e].data_ptr<index_t>(), it.begin, it.end, numel);
      });
    }
  });
  for (size_t w = 0; w < items.size(); ++w) {
    if (bad[w] < 0) continue;
    const int64_t e = items[w].e, i = bad[w];
    const auto& t = idx[e];
    raise_bad_index(entry_name(op, e, target[e]), i, t[i].item<int64_t>(), i > 0 ? t[i - 1].item<int64_t>() : 0,
                    dense[target[e]].numel());
  }
}

// Work items of apply and restore: [lo, hi) index ranges of one tensor, so that every element
// is written by one thread even where entries overlap.
struct Work { int64_t t, lo, hi; };

std::vector<Work> tensor_work(at::TensorList dense, const std::vector<std::vector<int64_t>>& groups,
                              const std::vector<at::Tensor>& idx) {
  std::vector<Work> work;
  for (int64_t t = 0; t < static_cast<int64_t>(groups.size()); ++t) {
    int64_t total = 0;
    for (int64_t e : groups[t]) total += idx[e].numel();
    if (total == 0) continue;
    for (auto [lo, hi] : index_ranges(dense[t].numel(), total)) work.push_back({t, lo, hi});
  }
  return work;
}

// One entry's positions [from, end) of a range that no other entry touches.
template <typename scalar_t, typename index_t>
void apply_one(scalar_t* d, const index_t* idx, int64_t from, int64_t end, const scalar_t* v, scalar_t* saved,
               acc_t<scalar_t> alpha) {
  for (int64_t i = from; i < end; ++i) {
    __builtin_prefetch(d + idx[std::min(i + kPrefetch, end - 1)], 1);
    saved[i] = d[idx[i]];
    d[idx[i]] = add_shares(saved[i], axpy_acc<scalar_t>(0, v[i], alpha));
  }
}

// Two entries on one range, merged in one pass that updates d as it goes. Every choice is a
// select (which span holds the next index is unpredictable), d's lines are prefetched
// kPrefetch indices ahead on both spans, and a position not taken now is written again when it
// is taken. One pass instead of three loops over scratch: a language + task diff on XLM-R-base,
// 1.15-1.35x faster at 1% and 1.2-1.3x at 5% (five runs of 8 A/B pairs in one process, 2
// threads); the prefetch distance (8 to 64) made no difference.
template <typename scalar_t, typename index_t>
void apply_two(scalar_t* d, const Span<index_t>& a, const Span<index_t>& b, const scalar_t* va, const scalar_t* vb,
               scalar_t* sa, scalar_t* sb, acc_t<scalar_t> alpha_a, acc_t<scalar_t> alpha_b) {
  using a_t = acc_t<scalar_t>;
  int64_t i = a.pos, j = b.pos;
  for (; i < a.end && j < b.end;) {
    __builtin_prefetch(d + a.idx[std::min(i + kPrefetch, a.end - 1)], 1);
    __builtin_prefetch(d + b.idx[std::min(j + kPrefetch, b.end - 1)], 1);
    const int64_t x = a.idx[i], y = b.idx[j];
    const bool take_a = x <= y, take_b = y <= x;
    // Indexed by take_a + 2 take_b - 1: a nested ?: on floats compiled to two unpredictable
    // branches (GCC 12), and this select made apply 1.4x faster at 5% (A/B in one process).
    a_t share[3];
    share[0] = axpy_acc<scalar_t>(0, va[i], alpha_a);
    share[1] = axpy_acc<scalar_t>(0, vb[j], alpha_b);
    share[2] = axpy_acc(share[0], vb[j], alpha_b);
    const int64_t u = take_a ? x : y;
    const scalar_t old = d[u];
    d[u] = add_shares(old, share[take_a + 2 * take_b - 1]);
    sa[i] = old;
    sb[j] = old;
    i += take_a;
    j += take_b;
  }
  apply_one<scalar_t>(d, a.idx, i, a.end, va, sa, alpha_a);
  apply_one<scalar_t>(d, b.idx, j, b.end, vb, sb, alpha_b);
}

template <typename scalar_t, typename index_t>
void apply_range(scalar_t* d, const std::vector<int64_t>& group, const std::vector<at::Tensor>& idx,
                 const std::vector<at::Tensor>& val, const std::vector<at::Tensor>& saved,
                 at::ArrayRef<double> alphas, int64_t lo, int64_t hi) {
  using a_t = acc_t<scalar_t>;
  const size_t n = group.size();
  std::vector<Span<index_t>> spans(n);
  std::vector<const scalar_t*> v(n);
  std::vector<scalar_t*> s(n);
  std::vector<a_t> a(n);
  for (size_t g = 0; g < n; ++g) {
    const int64_t e = group[g];
    spans[g] = span_in(idx[e].data_ptr<index_t>(), idx[e].numel(), lo, hi);
    v[g] = val[e].data_ptr<scalar_t>();
    s[g] = saved[e].data_ptr<scalar_t>();
    a[g] = static_cast<a_t>(alphas[e]);
  }
  // Only the entries with indices in this range take part.
  size_t live = 0;
  for (size_t g = 0; g < n; ++g)
    if (spans[g].pos < spans[g].end) {
      spans[live] = spans[g], v[live] = v[g], s[live] = s[g], a[live] = a[g];
      ++live;
    }
  spans.resize(live), v.resize(live), s.resize(live), a.resize(live);
  if (live == 0) return;
  const size_t n_live = live;
  if (n_live == 1) {  // one delta in this range: no union to form
    apply_one<scalar_t>(d, spans[0].idx, spans[0].pos, spans[0].end, v[0], s[0], a[0]);
    return;
  }
  if (n_live == 2) {  // a language diff plus a task diff, the common case
    apply_two<scalar_t>(d, spans[0], spans[1], v[0], v[1], s[0], s[1], a[0], a[1]);
    return;
  }
  // Three loops, so that the merge never waits on a cache miss in d and d is touched once per
  // union index: sum the shares over the union (sequential reads), update d saving the old
  // values, then hand each entry the old values at its own indices.
  // Scratch kept per thread across calls: fresh buffers per range would cost page faults.
  thread_local std::vector<std::vector<int64_t>> where;
  thread_local std::vector<int64_t> union_idx;
  thread_local std::vector<a_t> shares;
  thread_local std::vector<scalar_t> old;
  int64_t cap = 0;
  std::vector<int64_t> first(n_live);
  where.resize(n_live);
  for (size_t g = 0; g < n_live; ++g) {
    first[g] = spans[g].pos;
    where[g].resize(spans[g].end - spans[g].pos);
    cap += spans[g].end - spans[g].pos;
  }
  union_idx.resize(cap);
  shares.resize(cap);
  old.resize(cap);
  const int64_t u_end = union_shares(spans, v, a, union_idx.data(), shares.data(), where);
  for (int64_t u = 0; u < u_end; ++u) {
    __builtin_prefetch(d + union_idx[std::min(u + kPrefetch, u_end - 1)], 1);
    old[u] = d[union_idx[u]];
    d[union_idx[u]] = add_shares(old[u], shares[u]);
  }
  for (size_t g = 0; g < n_live; ++g)
    for (size_t i = 0; i < where[g].size(); ++i) s[g][first[g] + i] = old[where[g][i]];
}

void apply_diffs_cpu(at::TensorList dense, at::TensorList indices, at::TensorList values, at::IntArrayRef target,
                     at::ArrayRef<double> alphas, at::TensorList saved_out) {
  const char* op = "apply_diffs_";
  check_diff_entries(op, dense, indices, values, target);
  check_saved(op, values, alphas, saved_out);
  const int64_t n = static_cast<int64_t>(indices.size());
  std::vector<at::Tensor> idx(n), val(n), saved(saved_out.begin(), saved_out.end());
  for (int64_t e = 0; e < n; ++e) {
    idx[e] = indices[e].contiguous();
    val[e] = values[e].contiguous();
  }
  check_entry_indices(op, dense, idx, target);
  const auto groups = entries_by_target(static_cast<int64_t>(dense.size()), target);
  const auto work = tensor_work(dense, groups, idx);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const auto& item = work[w];
      const auto& group = groups[item.t];
      XLS_DISPATCH_FLOATS(dense[item.t].scalar_type(), "apply_diffs_", [&] {
        XLS_DISPATCH_INDEX(idx[group[0]].scalar_type(), "apply_diffs_", [&] {
          apply_range<scalar_t, index_t>(dense[item.t].data_ptr<scalar_t>(), group, idx, val, saved, alphas, item.lo,
                                         item.hi);
        });
      });
    }
  });
}

void restore_diffs_cpu(at::TensorList dense, at::TensorList indices, at::TensorList saved, at::IntArrayRef target) {
  const char* op = "restore_diffs_";
  check_diff_entries(op, dense, indices, saved, target);
  const int64_t n = static_cast<int64_t>(indices.size());
  std::vector<at::Tensor> idx(n), val(n);
  for (int64_t e = 0; e < n; ++e) {
    idx[e] = indices[e].contiguous();
    val[e] = saved[e].contiguous();
  }
  check_entry_indices(op, dense, idx, target);
  const auto groups = entries_by_target(static_cast<int64_t>(dense.size()), target);
  const auto work = tensor_work(dense, groups, idx);
  // Entries that share an element saved the same value; one thread owns each range.
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const Work& item = work[w];
      XLS_DISPATCH_FLOATS(dense[item.t].scalar_type(), "restore_diffs_", [&] {
        XLS_DISPATCH_INDEX(idx[groups[item.t][0]].scalar_type(), "restore_diffs_", [&] {
          scalar_t* d = dense[item.t].data_ptr<scalar_t>();
          for (int64_t e : groups[item.t]) {
            const auto s = span_in(idx[e].data_ptr<index_t>(), idx[e].numel(), item.lo, item.hi);
            const scalar_t* v = val[e].data_ptr<scalar_t>();
            for (int64_t i = s.pos; i < s.end; ++i) {
              __builtin_prefetch(d + s.idx[std::min(i + kPrefetch, s.end - 1)], 1);
              d[s.idx[i]] = v[i];
            }
          }
        });
      });
    }
  });
}

// --- merge_deltas ---

std::tuple<at::Tensor, at::Tensor> merge_deltas_cpu(at::TensorList indices, at::TensorList values,
                                                    at::ArrayRef<double> weights, int64_t numel) {
  const char* op = "merge_deltas";
  check_merge(op, indices, values, weights, numel);
  const int64_t n = static_cast<int64_t>(indices.size());
  const DeltaList deltas(indices, values);
  const std::vector<at::Tensor>&idx = deltas.idx, &val = deltas.val;
  const int64_t total = deltas.total;
  const auto ranges = index_ranges(std::max<int64_t>(numel, 1), std::max<int64_t>(total, 1));
  const int64_t parts = static_cast<int64_t>(ranges.size());
  at::Tensor out_idx, out_val;
  XLS_DISPATCH_FLOATS(val[0].scalar_type(), "merge_deltas", [&] {
    XLS_DISPATCH_INDEX(idx[0].scalar_type(), "merge_deltas", [&] {
      using a_t = acc_t<scalar_t>;
      auto spans_of = [&](int64_t r) {
        std::vector<Span<index_t>> spans(n);
        for (int64_t e = 0; e < n; ++e)
          spans[e] = span_in(idx[e].data_ptr<index_t>(), idx[e].numel(), ranges[r].first, ranges[r].second);
        return spans;
      };
      // Pass 1: the union's size in each range; pass 2: write at the range's offset.
      std::vector<int64_t> offset(parts + 1, 0);
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          auto spans = spans_of(r);
          int64_t count = 0;
          walk_union(spans, [&](int64_t j) {
            ++count;
            for (auto& s : spans) s.pos += s.at(j);
          });
          offset[r + 1] = count;
        }
      });
      for (int64_t r = 0; r < parts; ++r) offset[r + 1] += offset[r];
      out_idx = at::empty({offset[parts]}, idx[0].options());
      out_val = at::empty({offset[parts]}, val[0].options());
      index_t* oi = out_idx.data_ptr<index_t>();
      scalar_t* ov = out_val.data_ptr<scalar_t>();
      std::vector<const scalar_t*> vp(n);
      std::vector<a_t> w(n);
      for (int64_t e = 0; e < n; ++e) {
        vp[e] = val[e].data_ptr<scalar_t>();
        w[e] = static_cast<a_t>(weights[e]);
      }
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          auto spans = spans_of(r);
          int64_t o = offset[r];
          walk_union(spans, [&](int64_t j) {
            a_t acc = 0;
            for (int64_t e = 0; e < n; ++e) {
              if (!spans[e].at(j)) continue;
              acc = axpy_acc(acc, vp[e][spans[e].pos], w[e]);
              ++spans[e].pos;
            }
            oi[o] = static_cast<index_t>(j);
            ov[o++] = static_cast<scalar_t>(acc);
          });
        }
      });
    });
  });
  return {out_idx, out_val};
}

// --- topk_masks: radix select of the k-th largest magnitude, then one pass writing masks ---

// A contiguous piece of one tensor; pieces are listed in global (tensor, position) order.
struct Piece { int64_t t, begin, end; };

std::vector<Piece> pieces_of(const std::vector<at::Tensor>& ts) {
  constexpr int64_t kPiece = 1 << 16;
  std::vector<Piece> out;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t)
    for (int64_t b = 0; b < ts[t].numel(); b += kPiece) out.push_back({t, b, std::min(ts[t].numel(), b + kPiece)});
  return out;
}

// After the first radix pass: keys whose top digit is above `digit` are selected, below it not;
// the keys with that digit (the candidates, few) are gathered in position order and the k_left
// largest taken, ties to the earliest. One pass over the data writes the masks.
constexpr int64_t kMaxCandidates = int64_t(1) << 22;

template <typename scalar_t>
void topk_finish_with_candidates(const std::vector<at::Tensor>& ts, std::vector<at::Tensor>& masks,
                                 const std::vector<Piece>& pieces, int64_t digit, int shift, int64_t k_left) {
  using key = key_t<scalar_t>;
  struct Candidate { key k; int64_t piece, i; };
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<std::vector<Candidate>> found(np);
  at::parallel_for(0, np, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* x = ts[pieces[p].t].data_ptr<scalar_t>();
      bool* m = masks[pieces[p].t].data_ptr<bool>();
      for (int64_t i = pieces[p].begin; i < pieces[p].end; ++i) {
        const key kx = magnitude_key(x[i]);
        const int64_t top = static_cast<int64_t>(kx >> shift);
        m[i] = top > digit;
        if (top == digit) found[p].push_back({kx, p, i});
      }
    }
  });
  std::vector<Candidate> all;
  for (auto& f : found) all.insert(all.end(), f.begin(), f.end());
  // Stable: equal keys keep position order, so the earliest win ties.
  std::stable_sort(all.begin(), all.end(), [](const Candidate& a, const Candidate& b) { return a.k > b.k; });
  for (int64_t c = 0; c < k_left; ++c) {
    const int64_t t = pieces[all[c].piece].t;
    masks[t].data_ptr<bool>()[all[c].i] = true;
  }
}

template <typename scalar_t>
void topk_masks_kernel(const std::vector<at::Tensor>& ts, std::vector<at::Tensor>& masks, int64_t k) {
  using key = key_t<scalar_t>;
  constexpr int kBits = 8 * sizeof(key);
  const auto pieces = pieces_of(ts);
  const int64_t np = static_cast<int64_t>(pieces.size());
  const int threads = at::get_num_threads();
  std::vector<int64_t> hist(static_cast<size_t>(threads) * kRadixBins);
  std::atomic<int64_t> nan_at{-1};
  // Keys whose digits above `shift` equal `prefix` are the candidates; k_left of them remain to pick.
  key prefix = 0, known = 0;
  int64_t k_left = k;
  for (int shift = kBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, np, 1, [&](int64_t begin, int64_t end) {
      int64_t* h = hist.data() + static_cast<size_t>(at::get_thread_num()) * kRadixBins;
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* x = ts[pieces[p].t].data_ptr<scalar_t>();
        for (int64_t i = pieces[p].begin; i < pieces[p].end; ++i) {
          const key kx = magnitude_key(x[i]);
          if ((kx & known) == prefix) ++h[(kx >> shift) & (kRadixBins - 1)];
          if (shift == kBits - kRadixBits && kx > inf_key<scalar_t>()) nan_at = pieces[p].t;
        }
      }
    });
    TORCH_CHECK_VALUE(nan_at.load() < 0, "topk_masks: tensors[", nan_at.load(), "] holds NaN");
    for (int th = 1; th < threads; ++th)
      for (int64_t b = 0; b < kRadixBins; ++b) hist[b] += hist[static_cast<size_t>(th) * kRadixBins + b];
    const int64_t b = select_digit(hist.data(), kRadixBins, k_left);
    if (shift == kBits - kRadixBits && hist[b] <= kMaxCandidates) {
      // Few keys share the top digit b: finish in one more pass instead of two.
      topk_finish_with_candidates<scalar_t>(ts, masks, pieces, b, shift, k_left);
      return;
    }
    prefix |= static_cast<key>(b) << shift;
    known |= static_cast<key>(kRadixBins - 1) << shift;
  }
  // prefix is now the k-th largest key: take every larger key and the first k_left equal ones.
  const key threshold = prefix;
  const int64_t ties_total = hist[static_cast<size_t>(threshold & (kRadixBins - 1))];
  std::vector<int64_t> ties_before(np + 1, 0);
  if (k_left < ties_total) {  // ties are split: count them per piece to rank them by position
    at::parallel_for(0, np, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* x = ts[pieces[p].t].data_ptr<scalar_t>();
        int64_t c = 0;
        for (int64_t i = pieces[p].begin; i < pieces[p].end; ++i) c += magnitude_key(x[i]) == threshold;
        ties_before[p + 1] = c;
      }
    });
    for (int64_t p = 0; p < np; ++p) ties_before[p + 1] += ties_before[p];
  }
  at::parallel_for(0, np, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* x = ts[pieces[p].t].data_ptr<scalar_t>();
      bool* m = masks[pieces[p].t].data_ptr<bool>();
      if (k_left == ties_total) {  // every tie is taken: a plain comparison, which vectorises
        for (int64_t i = pieces[p].begin; i < pieces[p].end; ++i) m[i] = magnitude_key(x[i]) >= threshold;
        continue;
      }
      int64_t rank = ties_before[p];
      for (int64_t i = pieces[p].begin; i < pieces[p].end; ++i) {
        const key kx = magnitude_key(x[i]);
        const bool tie = kx == threshold;
        m[i] = kx > threshold || (tie && rank < k_left);
        rank += tie;
      }
    }
  });
}

std::vector<at::Tensor> topk_masks_cpu(at::TensorList tensors, int64_t k) {
  check_topk("topk_masks", tensors, k);
  std::vector<at::Tensor> ts, masks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    ts.push_back(tensors[t].contiguous());
    masks.push_back(at::empty(tensors[t].sizes(), tensors[t].options().dtype(at::kBool)));
  }
  if (k == 0) {
    for (auto& m : masks) m.zero_();
    return masks;
  }
  XLS_DISPATCH_FLOATS(ts[0].scalar_type(), "topk_masks", [&] { topk_masks_kernel<scalar_t>(ts, masks, k); });
  return masks;
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CPU, m) {
  m.impl("sparse_axpy_", &sparse_axpy_cpu);
  m.impl("apply_diffs_", &apply_diffs_cpu);
  m.impl("restore_diffs_", &restore_diffs_cpu);
  m.impl("merge_deltas", &merge_deltas_cpu);
  m.impl("topk_masks", &topk_masks_cpu);
}

}  // namespace xlsparse

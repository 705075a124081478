// CPU kernels of the matmul family: SDDMM and SpMM over transposed token chunks, and
// expert-ensemble mixing.
//
// The row loops are at::vec code in vec/matmul_vec.cpp, compiled once per CPU capability
// (xlsparse/cpu_kernels.h); this file runs them through the chosen table.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "xlsparse/checks.h"
#include "xlsparse/cpu_kernels.h"
#include "xlsparse/masked_add.h"
#include "xlsparse/matmul.h"

namespace xlsparse {
namespace {

// Tokens per chunk: a row of a transposed chunk (1 KiB) is a long dot product, and bᵀ of a
// 1024-wide b (1 MiB) still fits a Zen 4 L2.
constexpr int64_t kChunk = 256;
// SDDMM's token chunk at densities up to 2%: half of bᵀ's scratch, and measured (2 threads, T =
// 2048, alternating calls) 3-8% faster than 256 tokens at 1% on 4096 x 1024, 1024 x 4096 and
// 1024 x 1024, but 4-8% slower at 5%, where each transposed chunk feeds more dot products.
constexpr int64_t kSparseChunk = 128;
constexpr int64_t kSparseChunkMaxPercent = 2;
// Rows of a that SDDMM transposes at once: 256 × 1 KiB (a 256-token chunk) stays in L2 while their
// dot products run (transposing all of a task's rows at once spilled 2 MiB to L3; 64-row blocks
// measured 1.5x slower at 5% density on 4096 x 1024).
constexpr int64_t kRowBlock = 256;
// SDDMM's token parts: at least this many tokens each, at most kMaxTokenParts (K sums each).
constexpr int64_t kPartTokens = 1024;
constexpr int64_t kMaxTokenParts = 8;
// Output columns one SpMM task accumulates before adding them to token-major memory: 512-byte
// runs of each token's row (16 columns, one line, ran 2.4x slower at T = 2048, 4096 x 1024, 1%:
// rows 16 KiB apart defeat the prefetcher; 256 columns measured the same as 128).
constexpr int64_t kRows = 128;

// The row primitives for acc (float or double) of the chosen CPU capability.
template <typename acc>
const RowKernels<acc>& row_kernels() {
  if constexpr (std::is_same_v<acc, float>) {
    return matmul_kernels().f32;
  } else {
    return matmul_kernels().f64;
  }
}

// Row `src[0:n]` as acc values: the row itself when it already is, else a converted copy in `buf`.
template <typename scalar_t, typename acc>
const acc* as_acc(const scalar_t* src, int64_t n, acc* buf) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc>(src[i]);
    return buf;
  }
}

template <typename scalar_t, typename acc>
void store_row(scalar_t* dst, const acc* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (dst != src) std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// --- token selection and chunk transposition (shared by SDDMM and SpMM) ---

// The tokens an op runs over: positions [begin, end) of `index` (or of 0..T−1), each scaled.
template <typename acc>
struct Tokens {
  const int64_t* index = nullptr;
  int64_t begin = 0, end = 0;
  const acc* scale = nullptr;
  at::Tensor scale_storage;

  int64_t at(int64_t j) const { return index ? index[j] : j; }
};

template <typename acc>
Tokens<acc> select_tokens(const char* op, int64_t num_tokens, const c10::optional<at::Tensor>& token_index,
                          const c10::optional<at::Tensor>& token_bounds,
                          const c10::optional<at::Tensor>& token_scale, at::Tensor& index_storage) {
  check_token_values(op, num_tokens, token_index, token_bounds);
  Tokens<acc> tok;
  tok.end = num_tokens;
  if (token_index.has_value()) {
    index_storage = token_index->contiguous();
    tok.index = index_storage.data_ptr<int64_t>();
    tok.end = index_storage.numel();
    if (token_bounds.has_value()) {
      const auto b = token_bounds->contiguous();
      tok.begin = b.data_ptr<int64_t>()[0];
      tok.end = b.data_ptr<int64_t>()[1];
    }
  }
  if (token_scale.has_value()) {
    tok.scale_storage = token_scale->to(c10::CppTypeToScalarType<acc>::value).contiguous();
    tok.scale = tok.scale_storage.template data_ptr<acc>();
  }
  return tok;
}

inline int64_t round_up(int64_t n, int64_t w) { return (n + w - 1) / w * w; }

// dst[c − c0, jj] = scale[t] · src[t, c] for columns [c0, c1) and the chunk's tokens
// t = tok.at(j0 + jj), jj < n, as acc; columns n..round_up(n) of dst are zeros, so that row loops
// run whole vectors. dst has round_up(c1 − c0) rows of `stride` (a whole number of vectors) values.
// Float, double and bfloat16 go through the vector kernel, a register transpose of one vector-wide
// tile of token rows at a time; half is converted one value at a time. Runs inside a
// thread's task: every op below is one parallel region, since a barrier per chunk costs a
// scheduler slice whenever the cores are shared.
template <typename scalar_t, typename acc>
void transpose_chunk(const RowKernels<acc>& rk, const scalar_t* src, int64_t cols, int64_t c0, int64_t c1,
                     const Tokens<acc>& tok, int64_t j0, int64_t n, bool scaled, acc* dst, int64_t stride) {
  const int64_t w = rk.width;
  constexpr bool same = std::is_same_v<scalar_t, acc>, bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  if constexpr (same || bf16) {
    using row_t = std::conditional_t<same, acc, uint16_t>;  // bfloat16 rows travel as their bits
    std::vector<const row_t*> rows(w);
    std::vector<acc> scale(w);
    for (int64_t jt = 0; jt < n; jt += w) {
      const int64_t m = std::min(w, n - jt);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t t = tok.at(j0 + jt + j);
        rows[j] = reinterpret_cast<const row_t*>(src + t * cols + c0);
        scale[j] = scaled && tok.scale ? tok.scale[t] : acc(1);
      }
      const acc* s = scaled && tok.scale ? scale.data() : nullptr;
      const bool next_rows = !tok.index && jt + 2 * w <= n;  // the next call's rows: consecutive tokens
      if constexpr (same) {
        rk.transpose_rows(rows.data(), s, m, c1 - c0, dst + jt, stride, next_rows);
      } else {
        rk.transpose_rows_bf16(rows.data(), s, m, c1 - c0, dst + jt, stride, next_rows);
      }
    }
  } else {
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t t = tok.at(j0 + jj);
      const acc s = scaled && tok.scale ? tok.scale[t] : acc(1);
      const scalar_t* row = src + t * cols;
      for (int64_t c = c0; c < c1; ++c) dst[(c - c0) * stride + jj] = static_cast<acc>(row[c]) * s;
    }
    for (int64_t c = c0; c < c1; ++c) std::fill(dst + (c - c0) * stride + n, dst + (c - c0) * stride + round_up(n, w), acc(0));
  }
}

// --- SDDMM: dval[n] = Σ_t s_t a[t, r_n] b[t, c_n] ---

// The entries r·cols + c of sorted `indices` as c·rows + r, sorted, and the position in `indices`
// of each: a counting sort by column, stable, so each column's rows stay in order.
std::pair<at::Tensor, at::Tensor> entries_by_column(const at::Tensor& indices, int64_t rows, int64_t cols) {
  const int64_t k = indices.numel();
  auto swapped = at::empty({k}, at::kLong), order = at::empty({k}, at::kLong);
  int64_t* sp = swapped.data_ptr<int64_t>();
  int64_t* op = order.data_ptr<int64_t>();
  XLS_DISPATCH_INDEX(indices.scalar_type(), "sddmm", [&] {
    const index_t* ip = indices.data_ptr<index_t>();
    std::vector<int64_t> start(cols + 1, 0);
    for (int64_t e = 0; e < k; ++e) ++start[static_cast<int64_t>(ip[e]) % cols + 1];
    for (int64_t c = 0; c < cols; ++c) start[c + 1] += start[c];
    for (int64_t e = 0; e < k; ++e) {
      const int64_t r = static_cast<int64_t>(ip[e]) / cols, c = static_cast<int64_t>(ip[e]) - r * cols;
      const int64_t to = start[c]++;
      sp[to] = c * rows + r;
      op[to] = e;
    }
  });
  return {swapped, order};
}

at::Tensor sddmm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& indices,
                     const c10::optional<at::Tensor>& token_index, const c10::optional<at::Tensor>& token_bounds,
                     const c10::optional<at::Tensor>& token_scale) {
  check_token_matmul("sddmm", a, b, indices, token_index, token_bounds, token_scale);
  const int64_t rows = a.size(1), cols = b.size(1), k = indices.numel();
  check_indices("sddmm", indices, rows * cols);
  auto out = at::empty({k}, b.options());
  if (k == 0) return out;
  const auto ac = a.contiguous(), bc = b.contiguous(), idx = indices.contiguous();
  // All of bᵀ stays in cache for a token chunk while a's rows go by in blocks, so the narrower
  // operand should be b: with more columns than rows the two swap roles (the same products, the
  // entries taken column by column). 1024 x 4096 at 1%, T = 2048, one thread: 15.9 -> 12.4 ms, level
  // with 4096 x 1024's 11.8 ms (an ad-hoc A/B, 15 alternations, min).
  if (cols > rows) {
    const auto [swapped, order] = entries_by_column(idx, rows, cols);
    return out.index_copy_(0, order, sddmm_cpu(b, a, swapped, token_index, token_bounds, token_scale));
  }
  XLS_DISPATCH_FLOATS(b.scalar_type(), "sddmm", [&] {
    using acc = acc_t<scalar_t>;
    const RowKernels<acc>& rk = row_kernels<acc>();
    at::Tensor index_storage;
    const auto tok = select_tokens<acc>("sddmm", b.size(0), token_index, token_bounds, token_scale, index_storage);
    // Tasks split the tokens into parts of at least kPartTokens (a thread then reads its share of
    // a and b once) and the entries among the threads left; each token part sums into its own row,
    // added in part order. The parts never depend on the thread count: results are bit-identical
    // across thread counts.
    const int64_t threads = at::get_num_threads(), num_tok = tok.end - tok.begin;
    const int64_t token_parts = std::clamp<int64_t>(num_tok / kPartTokens, 1, kMaxTokenParts);
    const int64_t entry_parts = std::max<int64_t>(1, std::min(k, (threads + token_parts - 1) / token_parts));
    const int64_t tasks = token_parts * entry_parts;
    const auto acc_type = c10::CppTypeToScalarType<acc>::value;
    // All scratch comes from this thread, before the parallel loop, so that memory accounting
    // (torch's profiler records the calling thread's allocations) sees it. One slot per thread
    // that runs tasks (inside another parallel region this call runs inline: one slot): all of
    // bᵀ and one row block of aᵀ for a token chunk (rows vector-aligned, so a vector store never
    // splits a line), and each entry's column of bᵀ. One row of sums per token part.
    const bool inline_run = at::in_parallel_region();
    const int64_t slots = inline_run ? 1 : std::min(tasks, threads);
    const int64_t max_chunk = k * 100 <= kSparseChunkMaxPercent * rows * cols ? kSparseChunk : kChunk;
    const int64_t stride_max = round_up(std::min(max_chunk, (num_tok + token_parts - 1) / token_parts), rk.width);
    const int64_t slot_floats = (round_up(cols, rk.width) + kRowBlock) * stride_max;
    const int64_t slot_entries = (k + entry_parts - 1) / entry_parts;
    const auto scratch = at::empty({slots * slot_floats}, acc_type);
    const auto columns = at::empty({slots * slot_entries}, at::kLong);  // a const acc* per entry
    static_assert(sizeof(const acc*) == sizeof(int64_t));
    const auto sums = at::zeros({token_parts * k}, acc_type);
    acc* partial = sums.data_ptr<acc>();
    XLS_DISPATCH_INDEX(idx.scalar_type(), "sddmm", [&] {
      const index_t* ip = idx.data_ptr<index_t>();
      const int64_t w = rk.width;
      at::parallel_for(0, tasks, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t tp = p / entry_parts, ep = p % entry_parts;
          const int64_t begin = k * ep / entry_parts, end = k * (ep + 1) / entry_parts;
          const int64_t j_begin = tok.begin + num_tok * tp / token_parts, j_end = tok.begin + num_tok * (tp + 1) / token_parts;
          const int64_t chunk = std::min(max_chunk, j_end - j_begin), stride = round_up(chunk, w);
          acc* sum = partial + tp * k;
          const int64_t slot = inline_run ? 0 : at::get_thread_num();
          TORCH_INTERNAL_ASSERT(slot < slots, "sddmm: thread ", slot, " has no scratch slot");
          acc* bt = scratch.data_ptr<acc>() + slot * slot_floats;
          acc* at_rows = bt + round_up(cols, w) * stride;
          // Per entry, its column of bᵀ; the runs of entries sharing a row, and each run's row; the
          // runs of each row block. One division per entry: each task reads all its entries, and
          // four 64-bit divisions by the runtime `cols` per entry were a visible share at 1%.
          const acc** bcol = reinterpret_cast<const acc**>(columns.data_ptr<int64_t>()) + slot * slot_entries;
          std::vector<int64_t> run{begin}, run_row, block{0};
          for (int64_t e = begin; e < end; ++e) {
            const int64_t row = static_cast<int64_t>(ip[e]) / cols;
            bcol[e - begin] = bt + (ip[e] - row * cols) * stride;
            if (e == begin) {
              run_row.push_back(row);
            } else if (row != run_row.back()) {
              if (row / kRowBlock != run_row.back() / kRowBlock) block.push_back(static_cast<int64_t>(run.size()));
              run.push_back(e);
              run_row.push_back(row);
            }
          }
          block.push_back(static_cast<int64_t>(run.size()));
          run.push_back(end);
          // Per token chunk: all of bᵀ, then, block by block, the rows of a that hold entries, whose
          // dot products run while the block is in L2.
          for (int64_t j0 = j_begin; j0 < j_end; j0 += chunk) {
            const int64_t n = std::min(chunk, j_end - j0), n_pad = round_up(n, w);
            transpose_chunk(rk, bc.data_ptr<scalar_t>(), cols, 0, cols, tok, j0, n, true, bt, stride);
            for (size_t blk = 0; blk + 1 < block.size(); ++blk) {
              const int64_t r0 = run_row[block[blk]] / kRowBlock * kRowBlock;
              transpose_chunk(rk, ac.data_ptr<scalar_t>(), rows, r0, std::min(rows, r0 + kRowBlock), tok, j0, n, false,
                              at_rows, stride);
              for (int64_t q = block[blk]; q < block[blk + 1]; ++q) {
                const int64_t e = run[q];
                rk.dots(at_rows + (run_row[q] - r0) * stride, bcol + (e - begin), run[q + 1] - e, n_pad, sum + e);
              }
            }
          }
        }
      });
    });
    for (int64_t tp = 1; tp < token_parts; ++tp) {
      for (int64_t e = 0; e < k; ++e) partial[e] += partial[tp * k + e];
    }
    store_row(out.data_ptr<scalar_t>(), partial, k);
  });
  return out;
}

// out[t, g] += y[g − g0, jj] for the chunk's tokens t = tok.at(j0 + jj), jj < n, and the used
// columns g in [g0, g1) (out keeps its bits elsewhere). In fp32 and fp64, yᵀ (one row of kRows
// outputs per token, in `yt`) is added to each token's row of out as whole vectors: a scalar loop
// over the token-major out took 80% of SpMM at 1%, T = 2048.
template <typename scalar_t, typename acc>
void add_block(const RowKernels<acc>& rk, scalar_t* op, int64_t groups, int64_t g0, int64_t g1, const Tokens<acc>& tok,
               int64_t j0, int64_t n, const acc* y, int64_t stride, const bool* used, acc* yt, const acc** yrow) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    for (int64_t g = g0; g < g1; g += rk.width) {
      const int64_t m = std::min(rk.width, g1 - g);
      for (int64_t q = 0; q < m; ++q) yrow[q] = y + (g - g0 + q) * stride;
      rk.transpose_rows(yrow, nullptr, m, n, yt + (g - g0), kRows, false);
    }
    for (int64_t jj = 0; jj < n; ++jj) {
      masked_add(op + tok.at(j0 + jj) * groups + g0, yt + jj * kRows, used + g0, 0, g1 - g0);
    }
  } else {
    for (int64_t jj = 0; jj < n; ++jj) {
      scalar_t* orow = op + tok.at(j0 + jj) * groups;
      for (int64_t g = g0; g < g1; ++g) {
        if (used[g]) orow[g] = static_cast<scalar_t>(static_cast<acc>(orow[g]) + y[(g - g0) * stride + jj]);
      }
    }
  }
}

// --- SpMM: out[t, g] += Σ_e s_{t,e} Σ_{entries of delta e in group g} val · x[t, other] ---

// The entries of E deltas ordered by output column g, then by delta (a counting sort), as
// (x column, value): those of (g, e) are [start[g·E + e], start[g·E + e + 1]).
template <typename acc>
struct GroupedEntries {
  std::vector<int64_t> start, other;
  std::vector<acc> v;
  int64_t begin(int64_t g) const { return start[g * deltas]; }
  int64_t end(int64_t g) const { return start[(g + 1) * deltas]; }
  int64_t deltas = 1;
};

template <typename scalar_t, typename acc>
GroupedEntries<acc> group_entries(const char* op, at::TensorList indices, at::TensorList values, int64_t groups,
                                  int64_t dcols, bool transpose) {
  GroupedEntries<acc> ge;
  const int64_t E = static_cast<int64_t>(indices.size());
  ge.deltas = E;
  ge.start.assign(groups * E + 1, 0);
  const DeltaList deltas(indices, values);
  const std::vector<at::Tensor>&idx = deltas.idx, &val = deltas.val;
  ge.other.resize(deltas.total);
  ge.v.resize(deltas.total);
  // key of entry i of delta e: its group, then e
  auto each = [&](auto&& f) {
    for (int64_t e = 0; e < E; ++e) {
      XLS_DISPATCH_INDEX(idx[e].scalar_type(), op, [&] {
        const index_t* ip = idx[e].data_ptr<index_t>();
        const scalar_t* vp = val[e].data_ptr<scalar_t>();
        for (int64_t i = 0, n = idx[e].numel(); i < n; ++i) {
          const int64_t g = transpose ? ip[i] % dcols : ip[i] / dcols;
          f(g * E + e, transpose ? ip[i] / dcols : ip[i] % dcols, vp[i]);
        }
      });
    }
  };
  each([&](int64_t key, int64_t, scalar_t) { ++ge.start[1 + key]; });
  for (int64_t q = 0; q < groups * E; ++q) ge.start[q + 1] += ge.start[q];
  std::vector<int64_t> fill(ge.start.begin(), ge.start.end() - 1);
  each([&](int64_t key, int64_t other, scalar_t v) {
    const int64_t p = fill[key]++;
    ge.other[p] = other;
    ge.v[p] = static_cast<acc>(v);
  });
  return ge;
}

// out[t, g] += Σ_e s_e[t] Σ_{(g, e) entries} v · x[t, other] over the selected tokens. One delta
// is scaled by tok.scale while x is transposed; E > 1 deltas share one unscaled transposed chunk
// and one pass over out (an SpMM per delta did both E times: 5.3 of its 9 ms at T = 2048,
// 4096 x 1024, 1%, 2 threads), each scaled by its column of `gates` [T, E] inside the row loops.
template <typename scalar_t, typename acc>
void spmm_grouped(at::Tensor& out, const at::Tensor& xc, const GroupedEntries<acc>& ge, const Tokens<acc>& tok,
                  const acc* gates) {
  const RowKernels<acc>& rk = row_kernels<acc>();
  const int64_t groups = out.size(1), xcols = xc.size(1), E = ge.deltas;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t blocks = (groups + kRows - 1) / kRows;
  // Output columns with entries: only they are added to (out keeps its bits, -0.0 included, elsewhere).
  const std::unique_ptr<bool[]> used(new bool[groups]);
  for (int64_t g = 0; g < groups; ++g) used[g] = ge.begin(g) != ge.end(g);
  // scratch rows: the token count, at most kChunk, padded to whole vectors
  const int64_t chunk = std::min(kChunk, tok.end - tok.begin), stride = round_up(chunk, rk.width);
  // Each task owns blocks of kRows output columns (no two threads write one element) and
  // transposes the token chunks of x itself.
  at::parallel_for(0, blocks, std::max<int64_t>(1, blocks / 64), [&](int64_t b0, int64_t b1) {
    if (ge.begin(b0 * kRows) == ge.end(std::min(groups, b1 * kRows) - 1)) return;
    std::vector<acc> xt(round_up(xcols, rk.width) * stride), y(kRows * stride);
    std::vector<acc> yt(round_up(stride, rk.width) * kRows);  // yᵀ: [tokens, kRows]
    std::vector<const acc*> yrow(rk.width);
    std::vector<acc> scale(gates ? E * stride : 0, acc(0));  // each delta's gates over the chunk
    for (int64_t j0 = tok.begin; j0 < tok.end; j0 += chunk) {
      const int64_t n = std::min(chunk, tok.end - j0);
      transpose_chunk(rk, xc.data_ptr<scalar_t>(), xcols, 0, xcols, tok, j0, n, !gates, xt.data(), stride);
      if (gates) {
        for (int64_t e = 0; e < E; ++e) {
          for (int64_t jj = 0; jj < n; ++jj) scale[e * stride + jj] = gates[tok.at(j0 + jj) * E + e];
        }
      }
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t g0 = blk * kRows, g1 = std::min(groups, g0 + kRows);
        if (ge.begin(g0) == ge.end(g1 - 1)) continue;
        for (int64_t g = g0; g < g1; ++g) {
          acc* yr = y.data() + (g - g0) * stride;
          std::fill(yr, yr + n, acc(0));
          for (int64_t e = 0; e < E; ++e) {
            const acc* s = gates ? scale.data() + e * stride : nullptr;
            const int64_t* c = ge.other.data();
            int64_t p = ge.start[g * E + e];
            const int64_t p1 = ge.start[g * E + e + 1];
            for (; p + 4 <= p1; p += 4) {
              rk.axpy4(yr, ge.v.data() + p, xt.data() + c[p] * stride, xt.data() + c[p + 1] * stride,
                       xt.data() + c[p + 2] * stride, xt.data() + c[p + 3] * stride, s, n);
            }
            for (; p < p1; ++p) rk.axpy(yr, ge.v[p], xt.data() + c[p] * stride, s, n);
          }
        }
        add_block(rk, op, groups, g0, g1, tok, j0, n, y.data(), stride, used.get(), yt.data(), yrow.data());
      }
    }
  });
}

void spmm_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
              const c10::optional<at::Tensor>& token_index, const c10::optional<at::Tensor>& token_bounds,
              const c10::optional<at::Tensor>& token_scale, bool transpose) {
  check_token_matmul("spmm_", out, x, indices, token_index, token_bounds, token_scale);
  check_spmm(out, x, indices, values);
  // Δ is [groups, x cols] (out += X Δᵀ) or [x cols, groups] (transpose: out += X Δ).
  const int64_t groups = out.size(1), xcols = x.size(1);
  check_indices("spmm_", indices, groups * xcols);
  if (indices.numel() == 0) return;
  const auto xc = x.contiguous();
  XLS_DISPATCH_FLOATS(x.scalar_type(), "spmm_", [&] {
    using acc = acc_t<scalar_t>;
    at::Tensor index_storage;
    const auto tok = select_tokens<acc>("spmm_", x.size(0), token_index, token_bounds, token_scale, index_storage);
    if (tok.begin == tok.end) return;
    const auto ge = group_entries<scalar_t, acc>("spmm_", {indices}, {values}, groups, transpose ? groups : xcols,
                                                 transpose);
    spmm_grouped<scalar_t, acc>(out, xc, ge, tok, nullptr);
  });
}

// out[t] += Σ_e gates[t, e] · (x Δ_eᵀ)[t] (transpose: x Δ_e) over all tokens: the soft-gated
// experts of multi_delta_linear in one pass.
void spmm_gated_cpu(at::Tensor out, const at::Tensor& x, at::TensorList indices, at::TensorList values,
                    const at::Tensor& gates, bool transpose) {
  const int64_t E = static_cast<int64_t>(indices.size());
  TORCH_CHECK_VALUE(values.size() == indices.size(), "spmm_gated_: ", indices.size(), " index tensors but ",
                    values.size(), " value tensors");
  TORCH_CHECK_VALUE(gates.dim() == 2 && gates.size(0) == x.size(0) && gates.size(1) == E,
                    "spmm_gated_: gates must have shape [", x.size(0), ", ", E, "], got ", gates.sizes());
  const int64_t groups = out.size(1), xcols = x.size(1);
  for (int64_t e = 0; e < E; ++e) {
    check_token_matmul("spmm_gated_", out, x, indices[e], c10::nullopt, c10::nullopt, gates.select(1, e));
    check_spmm(out, x, indices[e], values[e], "spmm_gated_");
    check_indices("spmm_gated_", indices[e], groups * xcols);
  }
  if (E == 0 || x.size(0) == 0) return;
  const auto xc = x.contiguous();
  XLS_DISPATCH_FLOATS(x.scalar_type(), "spmm_gated_", [&] {
    using acc = acc_t<scalar_t>;
    Tokens<acc> tok;
    tok.end = x.size(0);
    const auto ge = group_entries<scalar_t, acc>("spmm_gated_", indices, values, groups, transpose ? groups : xcols,
                                                 transpose);
    if (ge.v.empty()) return;
    const auto g = gates.to(c10::CppTypeToScalarType<acc>::value).contiguous();
    spmm_grouped<scalar_t, acc>(out, xc, ge, tok, g.data_ptr<acc>());
  });
}

// --- expert-ensemble mixing; every kernel runs one token per task ---

// Σ_v d[v] z[v] with 0 · (±inf) = 0 (times_nonzero): the vector dot, redone a term at a time
// only when it came out NaN, which a class an expert bans (z = −inf where d = 0) causes.
template <typename acc>
acc grad_dot(const RowKernels<acc>& rk, const acc* d, const acc* z, int64_t n) {
  const acc fast = rk.dot(d, z, n);
  if (!std::isnan(fast)) return fast;
  acc sum = 0;
  for (int64_t v = 0; v < n; ++v) sum += times_nonzero(d[v], z[v]);
  return sum;
}

// Per-task scratch: the E logit rows of a token as acc, plus `extra` more rows of V.
template <typename scalar_t, typename acc>
struct TokenRows {
  int64_t E, T, V;
  std::vector<acc> buf;
  std::vector<const acc*> z;
  TokenRows(int64_t E_, int64_t T_, int64_t V_, int extra)
      : E(E_), T(T_), V(V_), buf((std::is_same_v<scalar_t, acc> ? 0 : E_ * V_) + extra * V_), z(E_) {}
  void load(const scalar_t* logits, int64_t t) {
    for (int64_t e = 0; e < E; ++e) z[e] = as_acc(logits + (e * T + t) * V, V, buf.data() + e * V);
  }
  acc* row(int i) { return buf.data() + buf.size() - (i + 1) * V; }
  // zbar = Σ_e w_e z_e, the logit-space mixture (w_e = exp(lw[e]), lw: the token's log-weights).
  // An expert of weight 0 (dropped by top-k) adds nothing, even where its logits are ±inf.
  void mix(const RowKernels<acc>& rk, const acc* lw, acc* zbar) const {
    std::fill(zbar, zbar + V, acc(0));
    for (int64_t e = 0; e < E; ++e)
      if (const acc w = std::exp(lw[e]); w != 0) rk.axpy(zbar, w, z[e], nullptr, V);
  }
  // One expert of weight 1 (a plain cross-entropy) is its own mixture: no pass over the row.
  bool unmixed(const acc* lw) const { return E == 1 && lw[0] == acc(0); }
  // The mixed logits: z_0 itself when unmixed, else `mix` written into zbar. Skipping the fill and
  // the axpy took a [2048, 250002] fp32 nll from 0.25 to 0.18 s forward and from 1.05 to 0.87 s
  // backward (2 threads, Zen 4, 4 runs each; about 0.5 s of the backward is the page faults of its
  // fresh 2 GB gradient).
  const acc* mixed(const RowKernels<acc>& rk, const acc* lw, acc* zbar) const {
    if (unmixed(lw)) return z[0];
    mix(rk, lw, zbar);
    return zbar;
  }
  // Back through `mix` from d = ∂L/∂zbar: ∂L/∂z_e = w_e d into token t's row of expert e in dz,
  // and ∂L/∂log w_e = w_e ⟨d, z_e⟩ into dw's row of token t. tmp is a scratch row.
  void mix_backward(const RowKernels<acc>& rk, const acc* lw, const acc* d, int64_t t, acc* tmp, scalar_t* dz,
                    acc* dw) const {
    for (int64_t e = 0; e < E; ++e) {
      const acc w = std::exp(lw[e]);
      if (unmixed(lw)) {
        store_row(dz + t * V, d, V);
      } else {
        std::fill(tmp, tmp + V, acc(0));
        rk.axpy(tmp, w, d, nullptr, V);
        store_row(dz + (e * T + t) * V, tmp, V);
      }
      dw[t * E + e] = times_nonzero(w, grad_dot(rk, d, z[e], V));
    }
  }
};

// Below this mixture sum (the probability of a class under the mixture) the vector path lost
// digits to underflow: such classes are redone one term at a time.
template <typename acc>
constexpr acc kTinyMixture = std::is_same_v<acc, float> ? acc(1e-30) : acc(1e-300);

// The prob-space log-mixture of the token in `rows`: o[v] = log Σ_e exp(lw[e] + z_e[v] − lse_e) in
// acc, with lse_e written to lse[e * lse_stride]. The forward's output before rounding, recomputed
// bit for bit by the backward, which must not read the rounded out (bf16 near −10: a 0.0625 grid,
// ~1% off in the posterior). p_e = exp(z_e − max_e) once per class, left in rows.row(p0 + e), with
// Σ_v p_e in sums[e] (when given); the mixture sum s = Σ_e a_e p_e, a_e = w_e / Σ_v p_e, is left in
// s: E exponentials and one log per class instead of 2E + 1.
template <typename scalar_t, typename acc>
void prob_mixture(const RowKernels<acc>& rk, TokenRows<scalar_t, acc>& rows, const acc* lw, acc* lse,
                  int64_t lse_stride, acc* s, acc* o, int p0, acc* sums = nullptr) {
  const int64_t E = rows.E, V = rows.V;
  std::fill(s, s + V, acc(0));
  for (int64_t e = 0; e < E; ++e) {
    acc* pe = rows.row(p0 + static_cast<int>(e));
    const acc mx = rk.row_max(rows.z[e], V);
    const acc sum_e = rk.exp_store(pe, rows.z[e], mx, V);
    if (sums) sums[e] = sum_e;
    lse[e * lse_stride] = mx == -std::numeric_limits<acc>::infinity() ? mx : mx + std::log(sum_e);  // as row_lse
    rk.axpy(s, std::exp(lw[e] - std::log(sum_e)), pe, nullptr, V);
  }
  rk.vlog(o, s, V);
  // A class every expert gives probability below ~1e-30 underflowed: redo it exactly (log_mixture in
  // matmul.h; −inf where every expert bans it).
  for (int64_t v = 0; v < V; ++v) {
    if (s[v] >= kTinyMixture<acc>) continue;
    o[v] = log_mixture<acc>(E, [&](int64_t e) { return lw[e] + rows.z[e][v] - lse[e * lse_stride]; });
  }
}

std::tuple<at::Tensor, at::Tensor> ensemble_logprobs_cpu(const at::Tensor& logits, const at::Tensor& log_weights,
                                                         bool prob_space) {
  check_ensemble("ensemble_logprobs", logits, log_weights, nullptr);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  auto out = at::empty({T, V}, logits.options());
  auto lse = at::empty({prob_space ? E : 1, T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  const auto z = logits.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_logprobs", [&] {
    using acc = acc_t<scalar_t>;
    const RowKernels<acc>& rk = row_kernels<acc>();
    const auto lw = log_weights.to(lse.scalar_type()).contiguous();
    const acc* lwp = lw.data_ptr<acc>();
    acc* lp = lse.data_ptr<acc>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      // Rows: scratch for the token's E exponentiated logit rows (in cache, never E x T x V),
      // then the mixture sum and the output.
      TokenRows<scalar_t, acc> rows(E, T, V, prob_space ? static_cast<int>(E) + 2 : 2);
      acc *s = rows.row(0), *o = rows.row(1);
      for (int64_t t = t0; t < t1; ++t) {
        rows.load(z.data_ptr<scalar_t>(), t);
        if (prob_space) {
          prob_mixture(rk, rows, lwp + t * E, lp + t, T, s, o, 2);
        } else {
          const acc* zbar = rows.mixed(rk, lwp + t * E, s);
          lp[t] = rk.row_lse(zbar, V);
          rk.add_scalar(o, zbar, -lp[t], V);
        }
        store_row(out.data_ptr<scalar_t>() + t * V, o, V);
      }
    });
  });
  return std::make_tuple(out, lse);
}

std::tuple<at::Tensor, at::Tensor> ensemble_logprobs_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                                  const at::Tensor& log_weights, const at::Tensor& out,
                                                                  const at::Tensor& lse, bool prob_space) {
  check_ensemble("ensemble_logprobs_backward", logits, log_weights, nullptr);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_ensemble_saved("ensemble_logprobs_backward", logits, grad, out, lse, prob_space, false);
  auto dlogits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  auto dlw = at::empty({T, E}, log_weights.options().dtype(acc_dtype(logits.scalar_type())));
  // out is checked (shape, dtype) but not read: it is rounded to the logits' dtype
  const auto z = logits.contiguous(), g = grad.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_logprobs_backward", [&] {
    using acc = acc_t<scalar_t>;
    const RowKernels<acc>& rk = row_kernels<acc>();
    const auto lw = log_weights.to(lse.scalar_type()).contiguous();
    const auto lsec = lse.contiguous();
    const acc *lwp = lw.data_ptr<acc>(), *lp = lsec.data_ptr<acc>();
    scalar_t* dz = dlogits.data_ptr<scalar_t>();
    acc* dw = dlw.data_ptr<acc>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      // gb: grad, ob: the log-probs recomputed in acc, d: the mixture sum (prob) or the mixed
      // logits' gradient (logit), tmp: scratch, then (prob) r = g / the mixture sum and the E rows
      // prob_mixture leaves.
      TokenRows<scalar_t, acc> rows(E, T, V, prob_space ? static_cast<int>(E) + 5 : 4);
      acc *gb = rows.row(0), *ob = rows.row(1), *d = rows.row(2), *tmp = rows.row(3), *r = rows.row(4);
      std::vector<acc> lse_again(E), sums(E);  // the forward's lse, recomputed on the way (the saved one is used below)
      std::vector<int64_t> exact;  // classes whose mixture sum underflowed
      for (int64_t t = t0; t < t1; ++t) {
        rows.load(z.data_ptr<scalar_t>(), t);
        const acc* gr = as_acc(g.data_ptr<scalar_t>() + t * V, V, gb);
        if (prob_space) {
          prob_mixture(rk, rows, lwp + t * E, lse_again.data(), 1, d, ob, 5, sums.data());
          // The posterior of expert e is q_e = w_e p_e / s with p_e = pe / Σ pe and s the mixture sum,
          // so S_e = Σ_v g q_e = (w_e / Σ pe) ⟨g / s, pe⟩ and dz_e = g q_e − p_e S_e
          // = pe (w_e r − S_e) / Σ pe: no exponential beyond the forward's. Classes whose sum
          // underflowed take the term-by-term formulas (dot_exp, prob_grad); a class every expert
          // bans has posterior 0 (out_for_posterior in matmul.h).
          for (int64_t v = 0; v < V; ++v) r[v] = d[v] >= kTinyMixture<acc> ? gr[v] / d[v] : acc(0);  // vectorized
          exact.clear();
          for (int64_t v = 0; v < V; ++v) {
            // r past the float range (g = 1e10 over s = 3e-30) made dz NaN: the term-by-term formulas never form it
            if (d[v] >= kTinyMixture<acc> && std::isfinite(r[v])) continue;
            r[v] = acc(0);
            exact.push_back(v);
            ob[v] = out_for_posterior(ob[v]);
          }
          for (int64_t e = 0; e < E; ++e) {
            const acc lse_e = lp[e * T + t], lw_e = lwp[t * E + e];
            const acc* pe = rows.row(5 + static_cast<int>(e));
            const acc* ze = rows.z[e];
            const acc c = std::exp(lw_e) / sums[e];
            acc S = c * rk.dot(r, pe, V);
            for (int64_t v : exact) S += rk.dot_exp(gr + v, ze + v, -lse_e, lw_e, ob + v, 1);
            std::fill(tmp, tmp + V, acc(0));
            rk.axpy(tmp, c, r, pe, V);
            rk.axpy(tmp, -S / sums[e], pe, nullptr, V);
            for (int64_t v : exact) rk.prob_grad(tmp + v, gr + v, ze + v, lse_e, lw_e, ob + v, S, 1);
            store_row(dz + (e * T + t) * V, tmp, V);
            dw[t * E + e] = S;
          }
        } else {
          // the forward's log-probs before rounding: the mixed logits minus the saved lse
          rk.add_scalar(ob, rows.mixed(rk, lwp + t * E, tmp), -lp[t], V);
          rk.softmax_grad(d, gr, ob, rk.sum(gr, V), V);  // gradient of the mixed logits
          rows.mix_backward(rk, lwp + t * E, d, t, tmp, dz, dw);
        }
      }
    });
  });
  return std::make_tuple(dlogits, dlw.to(log_weights.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> ensemble_nll_cpu(const at::Tensor& logits, const at::Tensor& log_weights,
                                                    const at::Tensor& targets, bool prob_space) {
  check_ensemble("ensemble_nll", logits, log_weights, &targets);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_targets("ensemble_nll", targets, V);
  // nll in the accumulation dtype, like lse: the prob-space backward's posterior reads it
  auto nll = at::empty({T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  auto lse = at::empty({prob_space ? E : 1, T}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  const auto z = logits.contiguous(), y = targets.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_nll", [&] {
    using acc = acc_t<scalar_t>;
    const RowKernels<acc>& rk = row_kernels<acc>();
    const auto lw = log_weights.to(lse.scalar_type()).contiguous();
    const acc* lwp = lw.data_ptr<acc>();
    acc* lp = lse.data_ptr<acc>();
    const int64_t* yp = y.data_ptr<int64_t>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      TokenRows<scalar_t, acc> rows(E, T, V, 1);
      acc* zbar = rows.row(0);
      for (int64_t t = t0; t < t1; ++t) {
        rows.load(z.data_ptr<scalar_t>(), t);
        const int64_t target = yp[t];
        acc result;
        if (prob_space) {
          acc mix = -std::numeric_limits<acc>::infinity();
          for (int64_t e = 0; e < E; ++e) {
            lp[e * T + t] = rk.row_lse(rows.z[e], V);
            mix = log_add_exp(mix, lwp[t * E + e] + rows.z[e][target] - lp[e * T + t]);
          }
          result = -mix;
        } else {
          const acc* mixed = rows.mixed(rk, lwp + t * E, zbar);
          lp[t] = rk.row_lse(mixed, V);
          result = lp[t] - mixed[target];
        }
        nll.data_ptr<acc>()[t] = result;
      }
    });
  });
  return std::make_tuple(nll, lse);
}

std::tuple<at::Tensor, at::Tensor> ensemble_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                             const at::Tensor& log_weights, const at::Tensor& targets,
                                                             const at::Tensor& nll, const at::Tensor& lse,
                                                             bool prob_space) {
  check_ensemble("ensemble_nll_backward", logits, log_weights, &targets);
  const int64_t E = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_ensemble_saved("ensemble_nll_backward", logits, grad, nll, lse, prob_space, true);
  check_targets("ensemble_nll_backward", targets, V);
  auto dlogits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  auto dlw = at::empty({T, E}, log_weights.options().dtype(acc_dtype(logits.scalar_type())));
  const auto z = logits.contiguous(), y = targets.contiguous();
  XLS_DISPATCH_FLOATS(logits.scalar_type(), "ensemble_nll_backward", [&] {
    using acc = acc_t<scalar_t>;
    const RowKernels<acc>& rk = row_kernels<acc>();
    const auto lw = log_weights.to(lse.scalar_type()).contiguous();
    const auto lsec = lse.contiguous();
    const auto gc = grad.contiguous(), nc = nll.contiguous();  // both in the accumulation dtype, as lse
    const acc *lwp = lw.data_ptr<acc>(), *lp = lsec.data_ptr<acc>(), *gp = gc.data_ptr<acc>(),
              *np = nc.data_ptr<acc>();
    const int64_t* yp = y.data_ptr<int64_t>();
    scalar_t* dz = dlogits.data_ptr<scalar_t>();
    acc* dw = dlw.data_ptr<acc>();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      TokenRows<scalar_t, acc> rows(E, T, V, 2);
      acc *d = rows.row(0), *tmp = rows.row(1);
      for (int64_t t = t0; t < t1; ++t) {
        rows.load(z.data_ptr<scalar_t>(), t);
        const int64_t target = yp[t];
        const acc g = gp[t];
        if (prob_space) {
          for (int64_t e = 0; e < E; ++e) {
            // posterior of expert e for the target; d nll / d z_e = post_e (softmax(z_e) − onehot)
            const acc post = std::exp(lwp[t * E + e] + rows.z[e][target] - lp[e * T + t] + nll_for_posterior(np[t]));
            rk.scaled_softmax(tmp, rows.z[e], lp[e * T + t], g * post, V);
            tmp[target] -= g * post;
            store_row(dz + (e * T + t) * V, tmp, V);
            dw[t * E + e] = -g * post;
          }
        } else {
          rk.scaled_softmax(d, rows.mixed(rk, lwp + t * E, d), lp[t], g, V);
          d[target] -= g;  // d nll / d zbar = g (softmax(zbar) − onehot)
          rows.mix_backward(rk, lwp + t * E, d, t, tmp, dz, dw);
        }
      }
    });
  });
  return std::make_tuple(dlogits, dlw.to(log_weights.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(xlsparse, CPU, m) {
  m.impl("sddmm", &sddmm_cpu);
  m.impl("spmm_", &spmm_cpu);
  m.impl("spmm_gated_", &spmm_gated_cpu);
  m.impl("ensemble_logprobs", &ensemble_logprobs_cpu);
  m.impl("ensemble_logprobs_backward", &ensemble_logprobs_backward_cpu);
  m.impl("ensemble_nll", &ensemble_nll_cpu);
  m.impl("ensemble_nll_backward", &ensemble_nll_backward_cpu);
}

}  // namespace xlsparse

// The CPU vector kernels compiled once per instruction set, as ATen compiles native/cpu.
//
// Each csrc/cpu/vec/*.cpp is built three times (setup.py): DEFAULT (baseline x86-64), AVX2 (+FMA)
// and AVX512 (F/BW/VL/DQ), with -DCPU_CAPABILITY=<name>, so that at::vec::Vectorized and its
// exp/log are the real vector versions in each. Every build defines its tables in namespace
// xlsparse::<name>; cpu_capability.cpp picks one set per process. Only raw pointers and plain
// structs cross into those files: an inline function compiled with AVX-512 flags and shared with
// baseline code could be the copy the linker keeps.
#pragma once

#include <cstdint>

#include "xlsparse/optim.h"

namespace xlsparse {

enum class CpuCapability { DEFAULT, AVX2, AVX512 };

// Chosen once per process: the best the CPU runs, or XLSPARSE_CPU_CAPABILITY (default|avx2|avx512),
// which throws if the name is unknown or the CPU lacks the instructions.
CpuCapability cpu_capability();
const char* cpu_capability_name();

// --- optim: float32 loops. Each runs entries [begin, end) of one parameter a vector at a time and
// returns where the scalar tail starts; entries whose mask byte is false are never changed. ---

struct FloatJob {
  float* p;
  const float* g;
  float* s0;  // exp_avg / momentum buffer
  float* s1;  // exp_avg_sq
  float* s2;  // max_exp_avg_sq (amsgrad)
  const float* init;  // l1_to_init anchors, or null
  const bool* mask;   // null: every entry
};

struct OptimKernels {
  int64_t (*adamw)(const FloatJob& q, int64_t begin, int64_t end, const AdamwCoef<float>& c, bool amsgrad);
  // Compact selection (int32 indices): gathers p and g, streams the K-sized state.
  int64_t (*adamw_compact)(const FloatJob& q, const int32_t* idx, int64_t begin, int64_t end,
                           const AdamwCoef<float>& c, bool amsgrad);
  // dst[i] += src[i] where mask[i], for i < the returned count (exact: outside the mask dst keeps its bits);
  // `overwrite`: dst is taken as zeros, not read (masked_add.h).
  int64_t (*masked_add)(float* dst, const float* src, const bool* mask, int64_t n, bool overwrite);
  int64_t (*sgd)(const FloatJob& q, int64_t begin, int64_t end, const SgdCoef<float>& c, bool first, bool momentum,
                 bool nesterov);
};

// --- matmul: row primitives over n contiguous values, float and double ---

template <typename T>
struct RowKernels {
  T (*dot)(const T* a, const T* b, int64_t n);
  // s[j] += Σ a·b_j for the m rows b_j: a is loaded once per eight multiply-adds (SDDMM is load-bound).
  void (*dots)(const T* a, const T* const* b, int64_t m, int64_t n, T* s);
  // dst[c·stride + j] = scale[j] · rows[j][c] (scale null: 1) for the m ≤ vector-width token rows,
  // c < cols. Writes whole vectors: round_up(cols) rows of dst, zeros in columns m..width−1.
  // `next_rows`: the next call's rows follow these at the same spacing (a hint: prefetch them).
  void (*transpose_rows)(const T* const* rows, const T* scale, int64_t m, int64_t cols, T* dst, int64_t stride,
                         bool next_rows);
  // The same from bfloat16 rows, given as their 16-bit patterns.
  void (*transpose_rows_bf16)(const uint16_t* const* rows, const T* scale, int64_t m, int64_t cols, T* dst,
                              int64_t stride, bool next_rows);
  // y += alpha · s ⊙ x, with s = `scale` (null: 1).
  void (*axpy)(T* y, T alpha, const T* x, const T* scale, int64_t n);
  // y += s ⊙ Σ_j alpha[j] x_j over four rows: y is loaded and stored once per four multiply-adds.
  void (*axpy4)(T* y, const T* alpha, const T* x0, const T* x1, const T* x2, const T* x3, const T* scale, int64_t n);
  T (*sum)(const T* x, int64_t n);
  T (*row_max)(const T* z, int64_t n);
  T (*row_lse)(const T* z, int64_t n);                    // log Σ exp(z)
  T (*exp_store)(T* p, const T* z, T m, int64_t n);       // p = exp(z − m); returns Σ p
  void (*vlog)(T* out, const T* x, int64_t n);
  void (*add_scalar)(T* out, const T* x, T c, int64_t n);
  T (*dot_exp)(const T* g, const T* z, T a, T b, const T* out, int64_t n);  // Σ g exp(z + a + b − out)
  // Prob-space backward: dz = g exp(z − lse + lw − out) − exp(z − lse) S.
  void (*prob_grad)(T* dz, const T* g, const T* z, T lse, T lw, const T* out, T S, int64_t n);
  void (*scaled_softmax)(T* out, const T* z, T lse, T a, int64_t n);   // out = a exp(z − lse)
  void (*softmax_grad)(T* d, const T* g, const T* logp, T G, int64_t n);  // d = g − exp(logp) G
  // The vector width in elements: scratch rows and columns are padded to it.
  int64_t width;
};

struct MatmulKernels {
  RowKernels<float> f32;
  RowKernels<double> f64;
};

// The tables of the chosen capability.
const OptimKernels& optim_kernels();
const MatmulKernels& matmul_kernels();

}  // namespace xlsparse

// The choice of one CPU kernel set per process (see xlsparse/cpu_kernels.h), like ATen's
// DispatchStub with its ATEN_CPU_CAPABILITY; ours has its own variable, XLSPARSE_CPU_CAPABILITY.
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <string>

#include "xlsparse/cpu_kernels.h"

namespace xlsparse {

// Defined by csrc/cpu/vec/*.cpp, once per capability.
#define XLS_CAPABILITY_TABLES(cap)           \
  namespace cap {                            \
  extern const OptimKernels optim_table;     \
  extern const MatmulKernels matmul_table;   \
  }
XLS_CAPABILITY_TABLES(DEFAULT)
#if defined(__x86_64__)
XLS_CAPABILITY_TABLES(AVX2)
XLS_CAPABILITY_TABLES(AVX512)
#endif
#undef XLS_CAPABILITY_TABLES

namespace {

constexpr const char* kNames[] = {"default", "avx2", "avx512"};

// The instructions each build was compiled with (setup.py); libgcc's check includes the OS's
// support for the wider registers.
bool cpu_runs(CpuCapability c) {
#if defined(__x86_64__)
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (c) {
    case CpuCapability::AVX512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuCapability::AVX2:
      return avx2;
    default:
      return true;
  }
#else
  return c == CpuCapability::DEFAULT;
#endif
}

CpuCapability choose() {
  const char* env = std::getenv("XLSPARSE_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') {
    for (auto c : {CpuCapability::AVX512, CpuCapability::AVX2})
      if (cpu_runs(c)) return c;
    return CpuCapability::DEFAULT;
  }
  std::string name(env);
  for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (int i = 0; i < 3; ++i) {
    if (name != kNames[i]) continue;
    const auto c = static_cast<CpuCapability>(i);
    TORCH_CHECK_VALUE(cpu_runs(c), "XLSPARSE_CPU_CAPABILITY=", env,
                      ": this CPU lacks the instructions of that kernel set; unset the variable to use the best it runs");
    return c;
  }
  TORCH_CHECK_VALUE(false, "XLSPARSE_CPU_CAPABILITY=", env, " is unknown; use default, avx2 or avx512");
}

template <typename Table>
const Table& chosen(const Table& default_table, const Table* avx2_table, const Table* avx512_table) {
  switch (cpu_capability()) {
    case CpuCapability::AVX512:
      return *avx512_table;
    case CpuCapability::AVX2:
      return *avx2_table;
    default:
      return default_table;
  }
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability c = choose();  // a throw leaves it unset: the next call throws again
  return c;
}

const char* cpu_capability_name() { return kNames[static_cast<int>(cpu_capability())]; }

// Other machines build DEFAULT alone (setup.py).
#if defined(__x86_64__)
#define XLS_X86_TABLE(cap, table) &cap::table
#else
#define XLS_X86_TABLE(cap, table) nullptr
#endif
const OptimKernels& optim_kernels() {
  return chosen(DEFAULT::optim_table, XLS_X86_TABLE(AVX2, optim_table), XLS_X86_TABLE(AVX512, optim_table));
}
const MatmulKernels& matmul_kernels() {
  return chosen(DEFAULT::matmul_table, XLS_X86_TABLE(AVX2, matmul_table), XLS_X86_TABLE(AVX512, matmul_table));
}

}  // namespace xlsparse

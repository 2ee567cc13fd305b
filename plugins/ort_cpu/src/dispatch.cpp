// Run-time choice of the kernel table: the widest instruction set the CPU (and OS) supports,
// optionally capped by a request (DHSA_ORT_ISA=generic|avx2|avx512).
#include <cstring>

#include "kernel_api.h"

namespace dhsa {
namespace {

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#if defined(DHSA_WITH_AVX512)
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
#endif

int rank_of(const char* name) {
  if (name == nullptr || *name == '\0') return 3;
  if (std::strcmp(name, "generic") == 0) return 1;
  if (std::strcmp(name, "avx2") == 0) return 2;
  return 3;  // "avx512", "best" or anything else: no cap
}

}  // namespace

const KernelTable& select_kernels(const char* requested) {
  const int cap = rank_of(requested);
#if defined(DHSA_WITH_AVX512)
  if (cap >= 3 && has_avx512()) return avx512::kTable;
#endif
  if (cap >= 2 && has_avx2()) return avx2::kTable;
  return generic::kTable;
}

}  // namespace dhsa

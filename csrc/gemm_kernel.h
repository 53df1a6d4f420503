// Micro-kernel interface shared by gemm.cpp (driver, packing, generic kernel) and
// gemm_avx2.cpp (compiled with -mavx2 -mfma, x86-64 only). Kept free of inline templates so the
// two translation units, built with different -m flags, never share a function body the linker
// could pick the wrong copy of.
#pragma once
#include <cstdint>

namespace ftte {
namespace gemm_detail {

// One MR x NR tile of C (row stride ldc):  C = alpha * sum_k Ap[k*MR + i] * Bp[k*NR + j] + beta * C.
// Ap / Bp are packed panels (64-byte aligned, zero padded). beta == 0 never reads C.
using MicroKernel = void (*)(int64_t kc, const float* Ap, const float* Bp, float* C, int64_t ldc, float alpha,
                             float beta);

struct KernelInfo {
  const char* name;
  int mr, nr;
  MicroKernel fn;
};

#if defined(FTTE_HAVE_AVX2_KERNEL) && FTTE_HAVE_AVX2_KERNEL
KernelInfo avx2_kernel();  // 6 x 16, defined in gemm_avx2.cpp
#endif

}  // namespace gemm_detail
}  // namespace ftte

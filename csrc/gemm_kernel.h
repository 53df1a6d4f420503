// Micro-kernel interface shared by gemm.cpp (driver, packing, generic kernel), gemm_avx2.cpp
// (compiled with -mavx2 -mfma) and gemm_avx512.cpp (-mavx512f -mfma), the last two x86-64 only. Kept free of inline templates so the
// two translation units, built with different -m flags, never share a function body the linker
// could pick the wrong copy of.
#pragma once
#include <cstdint>

namespace ftte {
namespace gemm_detail {

// One MR x NR tile of C (row stride ldc):  C = alpha * sum_k A[k*as + i] * B[k*bs + j] + beta * C,
// storing only rows i < m and columns j < n (1 <= m <= MR, 1 <= n <= NR). A and B are packed
// panels (as = MR, bs = NR; padding rows/columns hold finite filler) or, when the source already
// has that layout, the source itself (as / bs = its leading dimension); either way all MR x NR
// inputs are readable.
// beta == 0 never reads C.
using MicroKernel = void (*)(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C,
                             int64_t ldc, float alpha, float beta, int m, int n);

struct KernelInfo {
  const char* name;
  int mr, nr;
  MicroKernel fn;
};

// Dot-path block shape (generic and AVX2 blocks): rows of A x rows of B per block. The AVX-512
// block is kDotMR x kDot512NR: 32 registers hold 24 accumulators, so each load of A serves 8 rows.
constexpr int kDotMR = 3, kDotNR = 4, kDot512NR = 8;

#if defined(FTTE_HAVE_AVX2_KERNEL) && FTTE_HAVE_AVX2_KERNEL
KernelInfo avx2_kernel();  // 6 x 16, defined in gemm_avx2.cpp

// Dot-product block for C = A B^T with both operands' rows contiguous in k (the dense forward
// x @ W^T): C[i][j] = alpha * dot(a[i], b[j], K) + beta * C[i][j] for i < m <= 3, j < n <= 4.
// a[3] and b[4] must all be readable rows (callers repeat a real row for padding). Needs no
// packing; kept free of std:: templates so no AVX2 copy of a shared inline function exists.
void dot_block_avx2(int64_t K, const float* const* a, const float* const* b, float* C, int64_t ldc, float alpha,
                    float beta, int m, int n);

KernelInfo avx512_kernel();  // 8 x 32, defined in gemm_avx512.cpp
// The dot block above with 16-lane vectors, for kDotMR x kDot512NR blocks (b[8] readable rows).
void dot_block_avx512(int64_t K, const float* const* a, const float* const* b, float* C, int64_t ldc, float alpha,
                      float beta, int m, int n);
// dst[0:n] = src[0:n] in zmm moves: the dot path's copies of B rows are a few hundred bytes each,
// where memcpy's `rep movs` spent most of its time starting up (25 of a conv dW's 36 us).
void copy_floats_avx512(const float* src, int64_t n, float* dst);
#endif

}  // namespace gemm_detail
}  // namespace ftte

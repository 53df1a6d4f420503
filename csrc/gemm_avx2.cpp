// AVX2+FMA micro-kernel, 6 x 16: 12 ymm accumulators + 2 for the B row + 1 broadcast = 15 of 16
// registers, the classic Haswell/Zen shape. Only compiled on x86-64 (with -mavx2 -mfma) and only
// called after __builtin_cpu_supports says the CPU has both.
#include <immintrin.h>

#include "gemm_kernel.h"

namespace ftte {
namespace gemm_detail {
namespace {

constexpr int MR = 6, NR = 16;

void ukernel_6x16(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C, int64_t ldc,
                  float alpha, float beta, int m, int n) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);  // B may be read in place
    __m256 a;
    a = _mm256_broadcast_ss(A + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(A + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(A + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(A + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(A + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    A += as;
    B += bs;
  }
  const __m256 va = _mm256_set1_ps(alpha);
  __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (n < NR) {  // right edge: masked loads/stores (slow on AMD, so only where columns are missing)
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mk0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
    const __m256i mk1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lane);
    const __m256 vb = _mm256_set1_ps(beta);
    for (int i = 0; i < m; ++i) {
      float* c = C + i * ldc;
      __m256 r0 = _mm256_mul_ps(va, acc[i][0]), r1 = _mm256_mul_ps(va, acc[i][1]);
      if (beta != 0.f) {
        const __m256 o0 = _mm256_maskload_ps(c, mk0), o1 = _mm256_maskload_ps(c + 8, mk1);
        r0 = beta == 1.f ? _mm256_fmadd_ps(va, acc[i][0], o0) : _mm256_fmadd_ps(va, acc[i][0], _mm256_mul_ps(vb, o0));
        r1 = beta == 1.f ? _mm256_fmadd_ps(va, acc[i][1], o1) : _mm256_fmadd_ps(va, acc[i][1], _mm256_mul_ps(vb, o1));
      }
      _mm256_maskstore_ps(c, mk0, r0);
      _mm256_maskstore_ps(c + 8, mk1, r1);
    }
  } else if (m < MR) {  // bottom edge: whole rows, just fewer of them
    const __m256 vb = _mm256_set1_ps(beta);
    for (int i = 0; i < m; ++i) {
      float* c = C + i * ldc;
      __m256 r0 = _mm256_mul_ps(va, acc[i][0]), r1 = _mm256_mul_ps(va, acc[i][1]);
      if (beta != 0.f) {
        const __m256 o0 = _mm256_loadu_ps(c), o1 = _mm256_loadu_ps(c + 8);
        r0 = beta == 1.f ? _mm256_fmadd_ps(va, acc[i][0], o0) : _mm256_fmadd_ps(va, acc[i][0], _mm256_mul_ps(vb, o0));
        r1 = beta == 1.f ? _mm256_fmadd_ps(va, acc[i][1], o1) : _mm256_fmadd_ps(va, acc[i][1], _mm256_mul_ps(vb, o1));
      }
      _mm256_storeu_ps(c, r0);
      _mm256_storeu_ps(c + 8, r1);
    }
  } else if (beta == 0.f) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(C + i * ldc, _mm256_mul_ps(va, acc[i][0]));
      _mm256_storeu_ps(C + i * ldc + 8, _mm256_mul_ps(va, acc[i][1]));
    }
  } else if (beta == 1.f) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(C + i * ldc, _mm256_fmadd_ps(va, acc[i][0], _mm256_loadu_ps(C + i * ldc)));
      _mm256_storeu_ps(C + i * ldc + 8, _mm256_fmadd_ps(va, acc[i][1], _mm256_loadu_ps(C + i * ldc + 8)));
    }
  } else {
    const __m256 vb = _mm256_set1_ps(beta);
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(C + i * ldc, _mm256_fmadd_ps(va, acc[i][0], _mm256_mul_ps(vb, _mm256_loadu_ps(C + i * ldc))));
      _mm256_storeu_ps(C + i * ldc + 8,
                       _mm256_fmadd_ps(va, acc[i][1], _mm256_mul_ps(vb, _mm256_loadu_ps(C + i * ldc + 8))));
    }
  }
}

}  // namespace

KernelInfo avx2_kernel() { return {"avx2-fma", MR, NR, &ukernel_6x16}; }

}  // namespace gemm_detail
}  // namespace ftte

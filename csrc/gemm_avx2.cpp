// AVX2+FMA micro-kernel, 6 x 16: 12 ymm accumulators + 2 for the B row + 1 broadcast = 15 of 16
// registers, the classic Haswell/Zen shape. Only compiled on x86-64 (with -mavx2 -mfma) and only
// called after __builtin_cpu_supports says the CPU has both.
#include <immintrin.h>

#include "gemm_kernel.h"

namespace ftte {
namespace gemm_detail {
namespace {

constexpr int MR = 6, NR = 16;

// Stores rows i < m and columns j < n of the 16-wide accumulator rows acc (C = alpha * acc +
// beta * C; beta == 0 never reads C): the edge tiles of both kernels. Missing columns use masked
// loads/stores (slow on AMD, so only where columns are missing).
inline void store_edge(const __m256 (*acc)[2], float* C, int64_t ldc, float alpha, float beta, int m, int n) {
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mk0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
  const __m256i mk1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lane);
  const bool masked = n < NR;
  for (int i = 0; i < m; ++i) {
    float* c = C + i * ldc;
    __m256 r0 = _mm256_mul_ps(va, acc[i][0]), r1 = _mm256_mul_ps(va, acc[i][1]);
    if (beta != 0.f) {
      const __m256 o0 = masked ? _mm256_maskload_ps(c, mk0) : _mm256_loadu_ps(c);
      const __m256 o1 = masked ? _mm256_maskload_ps(c + 8, mk1) : _mm256_loadu_ps(c + 8);
      r0 = beta == 1.f ? _mm256_fmadd_ps(va, acc[i][0], o0) : _mm256_fmadd_ps(va, acc[i][0], _mm256_mul_ps(vb, o0));
      r1 = beta == 1.f ? _mm256_fmadd_ps(va, acc[i][1], o1) : _mm256_fmadd_ps(va, acc[i][1], _mm256_mul_ps(vb, o1));
    }
    if (masked) {
      _mm256_maskstore_ps(c, mk0, r0);
      _mm256_maskstore_ps(c + 8, mk1, r1);
    } else {
      _mm256_storeu_ps(c, r0);
      _mm256_storeu_ps(c + 8, r1);
    }
  }
}

// The last row panel of a product whose M is not a multiple of 6 (a batch of 32 is 5 x 6 + 2, a
// 16-row gradient tile 2 x 6 + 4): only R = 2 or 4 rows are computed instead of 6 (1/9 of the
// work of a 32-row product was rows that are never stored). Each C element is the same single
// FMA chain over k in the same order as in the 6-row kernel, so results are bit-identical to it.
template <int R>
void ukernel_short(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C, int64_t ldc,
                   float alpha, float beta, int m, int n) {
  static_assert(R == 2 || R == 4, "short panels of 2 or 4 rows");
  // Named accumulators (an indexed array made GCC store them to the stack every iteration).
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B), b1 = _mm256_loadu_ps(B + 8);
    __m256 a;
    a = _mm256_broadcast_ss(A + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    if (R == 4) {
      a = _mm256_broadcast_ss(A + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
      a = _mm256_broadcast_ss(A + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    }
    A += as;
    B += bs;
  }
  const __m256 acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  store_edge(acc, C, ldc, alpha, beta, m, n);
}

void ukernel_6x16(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C, int64_t ldc,
                  float alpha, float beta, int m, int n) {
  if (m <= 2) return ukernel_short<2>(kc, A, as, B, bs, C, ldc, alpha, beta, m, n);
  if (m <= 4) return ukernel_short<4>(kc, A, as, B, bs, C, ldc, alpha, beta, m, n);
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
  if (n < NR || m < MR) {  // right or bottom edge
    store_edge(acc, C, ldc, alpha, beta, m, n);
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

// Sum of the 8 lanes of each of four vectors, as one 4-vector {sum(v0), .., sum(v3)}.
inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 s01 = _mm256_hadd_ps(v0, v1), s23 = _mm256_hadd_ps(v2, v3);
  const __m256 s = _mm256_hadd_ps(s01, s23);  // lanes: {v0 v1 v2 v3} low half, same for high half
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

}  // namespace

void dot_block_avx2(int64_t K, const float* const* a, const float* const* b, float* C, int64_t ldc, float alpha,
                    float beta, int m, int n) {
  __m256 acc[kDotMR][kDotNR];
  for (int i = 0; i < kDotMR; ++i)
    for (int j = 0; j < kDotNR; ++j) acc[i][j] = _mm256_setzero_ps();
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(a0 + k), x1 = _mm256_loadu_ps(a1 + k), x2 = _mm256_loadu_ps(a2 + k);
    __m256 y;
    y = _mm256_loadu_ps(b0 + k);
    acc[0][0] = _mm256_fmadd_ps(x0, y, acc[0][0]); acc[1][0] = _mm256_fmadd_ps(x1, y, acc[1][0]); acc[2][0] = _mm256_fmadd_ps(x2, y, acc[2][0]);
    y = _mm256_loadu_ps(b1 + k);
    acc[0][1] = _mm256_fmadd_ps(x0, y, acc[0][1]); acc[1][1] = _mm256_fmadd_ps(x1, y, acc[1][1]); acc[2][1] = _mm256_fmadd_ps(x2, y, acc[2][1]);
    y = _mm256_loadu_ps(b2 + k);
    acc[0][2] = _mm256_fmadd_ps(x0, y, acc[0][2]); acc[1][2] = _mm256_fmadd_ps(x1, y, acc[1][2]); acc[2][2] = _mm256_fmadd_ps(x2, y, acc[2][2]);
    y = _mm256_loadu_ps(b3 + k);
    acc[0][3] = _mm256_fmadd_ps(x0, y, acc[0][3]); acc[1][3] = _mm256_fmadd_ps(x1, y, acc[1][3]); acc[2][3] = _mm256_fmadd_ps(x2, y, acc[2][3]);
  }
  if (k < K) {  // tail: masked loads read only the K - k remaining floats
    const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 x[3] = {_mm256_maskload_ps(a0 + k, mk), _mm256_maskload_ps(a1 + k, mk), _mm256_maskload_ps(a2 + k, mk)};
    const float* bj[4] = {b0, b1, b2, b3};
    for (int j = 0; j < kDotNR; ++j) {
      const __m256 y = _mm256_maskload_ps(bj[j] + k, mk);
      for (int i = 0; i < kDotMR; ++i) acc[i][j] = _mm256_fmadd_ps(x[i], y, acc[i][j]);
    }
  }
  const __m128 va = _mm_set1_ps(alpha), vb = _mm_set1_ps(beta);
  for (int i = 0; i < m; ++i) {
    __m128 r = _mm_mul_ps(va, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    float* c = C + i * ldc;
    alignas(16) float out[4];
    if (n == kDotNR) {
      if (beta != 0.f) r = _mm_add_ps(r, beta == 1.f ? _mm_loadu_ps(c) : _mm_mul_ps(vb, _mm_loadu_ps(c)));
      _mm_storeu_ps(c, r);
    } else {
      _mm_store_ps(out, r);
      for (int j = 0; j < n; ++j) c[j] = beta == 0.f ? out[j] : (beta == 1.f ? out[j] + c[j] : out[j] + beta * c[j]);
    }
  }
}

KernelInfo avx2_kernel() { return {"avx2-fma", MR, NR, &ukernel_6x16}; }

}  // namespace gemm_detail
}  // namespace ftte

// AVX-512F micro-kernel, 8 x 32: 16 zmm accumulators + 2 for the B row, A broadcast into the FMA.
// Only compiled on x86-64 (with -mavx512f -mfma) and only called after
// __builtin_cpu_supports("avx512f") says the CPU has it. 8 rows divide the row counts the
// engine's products have most (batch 32, 8/16/72 conv channels x taps, 256 features), so few
// panels run half empty; edges are masked loads and stores.
#include <immintrin.h>

#include "gemm_kernel.h"

namespace ftte {
namespace gemm_detail {
namespace {

constexpr int MR = 8, NR = 32;

inline __mmask16 first_lanes(int n) {  // lanes [0, n) of 16, n clamped to [0, 16]
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1u);
}

// C = alpha * acc + beta * C for rows i < m, columns j < n; beta == 0 never reads C.
inline void store_rows(const __m512* acc0, const __m512* acc1, int rows, float* C, int64_t ldc, float alpha,
                       float beta, int m, int n) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const __mmask16 k0 = first_lanes(n), k1 = first_lanes(n - 16);
  const int r = m < rows ? m : rows;
  for (int i = 0; i < r; ++i) {
    float* c = C + i * ldc;
    __m512 r0 = _mm512_mul_ps(va, acc0[i]), r1 = _mm512_mul_ps(va, acc1[i]);
    if (beta != 0.f) {
      const __m512 o0 = _mm512_maskz_loadu_ps(k0, c), o1 = _mm512_maskz_loadu_ps(k1, c + 16);
      r0 = _mm512_fmadd_ps(va, acc0[i], beta == 1.f ? o0 : _mm512_mul_ps(vb, o0));
      r1 = _mm512_fmadd_ps(va, acc1[i], beta == 1.f ? o1 : _mm512_mul_ps(vb, o1));
    }
    _mm512_mask_storeu_ps(c, k0, r0);
    _mm512_mask_storeu_ps(c + 16, k1, r1);
  }
}

// R rows (2, 4 or 8) of the tile. Each C element is one FMA chain over k in the same order for
// every R, so a short panel's results are bit-identical to the full kernel's. The accumulators
// are named, not an indexed array, so GCC keeps them in registers.
template <int R>
void ukernel_rows(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C, int64_t ldc,
                  float alpha, float beta, int m, int n) {
  static_assert(R == 2 || R == 4 || R == 8, "panels of 2, 4 or 8 rows");
  __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps(), c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
  __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps(), c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
  __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps(), c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
  __m512 c60 = _mm512_setzero_ps(), c61 = _mm512_setzero_ps(), c70 = _mm512_setzero_ps(), c71 = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(B), b1 = _mm512_loadu_ps(B + 16);  // B may be read in place
    __m512 a;
    a = _mm512_set1_ps(A[0]); c00 = _mm512_fmadd_ps(a, b0, c00); c01 = _mm512_fmadd_ps(a, b1, c01);
    a = _mm512_set1_ps(A[1]); c10 = _mm512_fmadd_ps(a, b0, c10); c11 = _mm512_fmadd_ps(a, b1, c11);
    if (R >= 4) {
      a = _mm512_set1_ps(A[2]); c20 = _mm512_fmadd_ps(a, b0, c20); c21 = _mm512_fmadd_ps(a, b1, c21);
      a = _mm512_set1_ps(A[3]); c30 = _mm512_fmadd_ps(a, b0, c30); c31 = _mm512_fmadd_ps(a, b1, c31);
    }
    if (R == 8) {
      a = _mm512_set1_ps(A[4]); c40 = _mm512_fmadd_ps(a, b0, c40); c41 = _mm512_fmadd_ps(a, b1, c41);
      a = _mm512_set1_ps(A[5]); c50 = _mm512_fmadd_ps(a, b0, c50); c51 = _mm512_fmadd_ps(a, b1, c51);
      a = _mm512_set1_ps(A[6]); c60 = _mm512_fmadd_ps(a, b0, c60); c61 = _mm512_fmadd_ps(a, b1, c61);
      a = _mm512_set1_ps(A[7]); c70 = _mm512_fmadd_ps(a, b0, c70); c71 = _mm512_fmadd_ps(a, b1, c71);
    }
    A += as;
    B += bs;
  }
  const __m512 acc0[MR] = {c00, c10, c20, c30, c40, c50, c60, c70};
  const __m512 acc1[MR] = {c01, c11, c21, c31, c41, c51, c61, c71};
  store_rows(acc0, acc1, R, C, ldc, alpha, beta, m, n);
}

void ukernel_8x32(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C, int64_t ldc,
                  float alpha, float beta, int m, int n) {
  if (m <= 2) return ukernel_rows<2>(kc, A, as, B, bs, C, ldc, alpha, beta, m, n);
  if (m <= 4) return ukernel_rows<4>(kc, A, as, B, bs, C, ldc, alpha, beta, m, n);
  ukernel_rows<8>(kc, A, as, B, bs, C, ldc, alpha, beta, m, n);
}

// {sum(v0), sum(v1), sum(v2), sum(v3)}: halves added down to 8 lanes, then AVX's pairwise adds.
inline __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  auto half = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 s01 = _mm256_hadd_ps(half(v0), half(v1)), s23 = _mm256_hadd_ps(half(v2), half(v3));
  const __m256 s = _mm256_hadd_ps(s01, s23);
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

}  // namespace

namespace {

// R (1 to 3) rows of A against NB (4 or 8) rows of B: a last block of 1 or 2 rows (batch 32 =
// 10 x 3 + 2, a 16-channel weight gradient = 5 x 3 + 1) or of at most 4 rows of B (a 3x3
// single-channel conv's 9 = 8 + 1 taps) does only its own FMAs, each element the same chain as
// in a full block.
template <int R, int NB>
void dot_rows(int64_t K, const float* const* a, const float* const* b, float* C, int64_t ldc, float alpha,
              float beta, int n) {
  __m512 acc[R][NB];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 x[R];
    for (int i = 0; i < R; ++i) x[i] = _mm512_loadu_ps(a[i] + k);
    for (int j = 0; j < NB; ++j) {
      const __m512 y = _mm512_loadu_ps(b[j] + k);
      for (int i = 0; i < R; ++i) acc[i][j] = _mm512_fmadd_ps(x[i], y, acc[i][j]);
    }
  }
  if (k < K) {  // tail: masked loads read only the K - k remaining floats
    const __mmask16 mk = first_lanes(static_cast<int>(K - k));
    __m512 x[R];
    for (int i = 0; i < R; ++i) x[i] = _mm512_maskz_loadu_ps(mk, a[i] + k);
    for (int j = 0; j < NB; ++j) {
      const __m512 y = _mm512_maskz_loadu_ps(mk, b[j] + k);
      for (int i = 0; i < R; ++i) acc[i][j] = _mm512_fmadd_ps(x[i], y, acc[i][j]);
    }
  }
  const __m128 va = _mm_set1_ps(alpha), vb = _mm_set1_ps(beta);
  for (int i = 0; i < R; ++i) {
    float* c = C + i * ldc;
    for (int h = 0; h < NB / 4; ++h) {  // four columns at a time
      const int w = n - 4 * h;
      if (w <= 0) break;
      __m128 r = _mm_mul_ps(va, hsum4(acc[i][4 * h], acc[i][4 * h + 1], acc[i][4 * h + 2], acc[i][4 * h + 3]));
      if (w >= 4) {
        if (beta != 0.f) r = _mm_add_ps(r, beta == 1.f ? _mm_loadu_ps(c + 4 * h) : _mm_mul_ps(vb, _mm_loadu_ps(c + 4 * h)));
        _mm_storeu_ps(c + 4 * h, r);
      } else {
        alignas(16) float out[4];
        _mm_store_ps(out, r);
        float* d = c + 4 * h;
        for (int j = 0; j < w; ++j) d[j] = beta == 0.f ? out[j] : (beta == 1.f ? out[j] + d[j] : out[j] + beta * d[j]);
      }
    }
  }
}

}  // namespace

void dot_block_avx512(int64_t K, const float* const* a, const float* const* b, float* C, int64_t ldc, float alpha,
                      float beta, int m, int n) {
  static_assert(kDotMR == 3 && kDot512NR == 8, "blocks of 1 to 3 rows of A, 4 or 8 of B");
  if (n <= 4) {
    if (m == 1) return dot_rows<1, 4>(K, a, b, C, ldc, alpha, beta, n);
    if (m == 2) return dot_rows<2, 4>(K, a, b, C, ldc, alpha, beta, n);
    return dot_rows<3, 4>(K, a, b, C, ldc, alpha, beta, n);
  }
  if (m == 1) return dot_rows<1, 8>(K, a, b, C, ldc, alpha, beta, n);
  if (m == 2) return dot_rows<2, 8>(K, a, b, C, ldc, alpha, beta, n);
  dot_rows<3, 8>(K, a, b, C, ldc, alpha, beta, n);
}

void copy_floats_avx512(const float* src, int64_t n, float* dst) {
  int64_t q = 0;
  for (; q + 16 <= n; q += 16) _mm512_storeu_ps(dst + q, _mm512_loadu_ps(src + q));
  if (q < n) {
    const __mmask16 mk = first_lanes(static_cast<int>(n - q));
    _mm512_mask_storeu_ps(dst + q, mk, _mm512_maskz_loadu_ps(mk, src + q));
  }
}

KernelInfo avx512_kernel() { return {"avx512", MR, NR, &ukernel_8x32}; }

}  // namespace gemm_detail
}  // namespace ftte

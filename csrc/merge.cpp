// Fused weighted merge: decode K updates and accumulate them into the selected target rows in
// one pass. Per row, a chunk of columns is accumulated over k (fixed order) in a small stack
// buffer and added to the target once, so each update byte is read once and each target element
// written once — versus K full read-modify-write sweeps of the target for the NumPy loop.
#include "merge.h"

#include <algorithm>

#include "codec.h"  // FTTE_VECTOR_CLONES, FTTE_ALWAYS_INLINE
#include "parallel.h"

namespace ftte {

namespace {

constexpr int64_t kChunk = 512;  // floats per accumulator chunk: 2 KB on the stack, stays in L1

inline int64_t rows_per_task(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

// Dispatch helper shared by the three merges: row blocks of fixed size (shape-dependent only).
template <class Fn>
void for_row_blocks(int64_t R, int64_t F, int64_t K, Fn&& fn) {
  const int64_t bs = rows_per_task(F);
  parallel_for(
      (R + bs - 1) / bs, [&](int64_t t) { fn(t * bs, std::min(R, t * bs + bs)); },
      2.0 * static_cast<double>(R) * static_cast<double>(F) * static_cast<double>(K + 1));
}

FTTE_VECTOR_CLONES
void merge_block_int8(float* target, int64_t F, const int32_t* rows, int64_t r0, int64_t r1, int64_t K,
                      const int8_t* const* qs, const float* const* scales, const float* alphas) {
  float acc[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    float* tr = target + (rows ? rows[r] : r) * F;
    for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
      const int64_t n = std::min(kChunk, F - c0);
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        // Same coefficient as NumPy's (alpha * scale) * q; a zero one (all-zero row, or a
        // zero weight) contributes exactly nothing, so skip reading that update.
        const float w = alphas[k] * scales[k][r];
        if (w == 0.0f) continue;
        const int8_t* q = qs[k] + r * F + c0;
        for (int64_t j = 0; j < n; ++j) acc[j] += w * static_cast<float>(q[j]);
      }
      for (int64_t j = 0; j < n; ++j) tr[c0 + j] += acc[j];
    }
  }
}

FTTE_VECTOR_CLONES
void merge_block_int4(float* target, int64_t F, const int32_t* rows, int64_t r0, int64_t r1, int64_t K,
                      const uint8_t* const* qs, const float* const* scales, const float* alphas) {
  const int64_t Fb = (F + 1) / 2;
  float acc[kChunk];
  int8_t u8[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    float* tr = target + (rows ? rows[r] : r) * F;
    for (int64_t c0 = 0; c0 < F; c0 += kChunk) {  // c0 even, so chunks start on a byte
      const int64_t n = std::min(kChunk, F - c0), pairs = n / 2;
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float w = alphas[k] * scales[k][r];
        if (w == 0.0f) continue;
        // Unpack to int8 first (a cheap byte shuffle), so the multiply-add below is the same
        // contiguous loop as int8's; accumulating into interleaved even/odd slots directly
        // vectorises poorly.
        const uint8_t* q = qs[k] + r * Fb + c0 / 2;
        for (int64_t i = 0; i < pairs; ++i) {
          u8[2 * i] = static_cast<int8_t>(static_cast<uint8_t>(q[i] << 4)) >> 4;
          u8[2 * i + 1] = static_cast<int8_t>(q[i]) >> 4;
        }
        if (n & 1) u8[n - 1] = static_cast<int8_t>(static_cast<uint8_t>(q[pairs] << 4)) >> 4;
        for (int64_t j = 0; j < n; ++j) acc[j] += w * static_cast<float>(u8[j]);
      }
      for (int64_t j = 0; j < n; ++j) tr[c0 + j] += acc[j];
    }
  }
}

FTTE_VECTOR_CLONES
void merge_block_float(float* target, int64_t F, const int32_t* rows, int64_t r0, int64_t r1, int64_t K,
                       const float* const* deltas, const float* alphas) {
  float acc[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    float* tr = target + (rows ? rows[r] : r) * F;
    for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
      const int64_t n = std::min(kChunk, F - c0);
      for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const float w = alphas[k];
        if (w == 0.0f) continue;
        const float* d = deltas[k] + r * F + c0;
        for (int64_t j = 0; j < n; ++j) acc[j] += w * d[j];
      }
      for (int64_t j = 0; j < n; ++j) tr[c0 + j] += acc[j];
    }
  }
}

}  // namespace

void merge_int8(float* target, int64_t F, const int32_t* rows, int64_t R, int64_t K, const int8_t* const* qs,
                const float* const* scales, const float* alphas) {
  for_row_blocks(R, F, K, [&](int64_t r0, int64_t r1) { merge_block_int8(target, F, rows, r0, r1, K, qs, scales, alphas); });
}

void merge_int4(float* target, int64_t F, const int32_t* rows, int64_t R, int64_t K, const uint8_t* const* qs,
                const float* const* scales, const float* alphas) {
  for_row_blocks(R, F, K, [&](int64_t r0, int64_t r1) { merge_block_int4(target, F, rows, r0, r1, K, qs, scales, alphas); });
}

void merge_float(float* target, int64_t F, const int32_t* rows, int64_t R, int64_t K, const float* const* deltas,
                 const float* alphas) {
  for_row_blocks(R, F, K, [&](int64_t r0, int64_t r1) { merge_block_float(target, F, rows, r0, r1, K, deltas, alphas); });
}

}  // namespace ftte

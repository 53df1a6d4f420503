// Delta codec, int8 and packed int4, nearest or stochastic rounding, with the matching decode.
// Everything is per row and rows are independent, so tasks are row blocks and the result is
// bit-identical for any thread count. The rounding uses only exact float steps (truncate, exact
// fraction, compare), so the bytes are also the same on x86-64, aarch64 and armv7 — an update
// encoded on a Pi decodes to the same numbers everywhere.
#include "codec.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "parallel.h"

namespace ftte {

namespace {

// lowbias32 (Wellons): a cheap 32-bit bijection with good avalanche, vectorisable (mul, xor, shift).
FTTE_ALWAYS_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Per-row key from (seed, r) through 64-bit splitmix; the per-column part stays 32-bit so the
// inner loop vectorises. Two mix rounds with independent keys decorrelate rows.
struct RowKey {
  uint32_t k1, k2;
};
inline RowKey row_key(uint64_t seed, int64_t r) {
  uint64_t k = splitmix64(splitmix64(seed) + static_cast<uint64_t>(r));
  return {static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
}
FTTE_ALWAYS_INLINE uint32_t col_bits(RowKey k, uint32_t c) { return mix32(mix32(c ^ k.k1) ^ k.k2); }

// max|new - base| over a row, and whether every delta is finite. Works on the bit patterns:
// for |d| (sign bit cleared) the unsigned int order is the float order, and Inf/NaN sort above
// every finite value, so one vectorisable integer max gives both answers. (A float max
// reduction does not vectorise without -ffinite-math-only.)
FTTE_ALWAYS_INLINE float row_absmax(const float* nr, const float* br, int64_t F, bool* finite) {
  int32_t m = 0;
  for (int64_t c = 0; c < F; ++c) {
    float d = nr[c] - br[c];
    int32_t b;
    std::memcpy(&b, &d, sizeof b);
    b &= 0x7fffffff;
    m = b > m ? b : m;
  }
  *finite = m < 0x7f800000;
  float a;
  std::memcpy(&a, &m, sizeof a);
  return a;
}

// Quantizes columns [c0, c0+n) of one row to integers in [-L, L] into dst[0..n).
// x = delta * inv (inv = 1/scale) except for rows so tiny that 1/scale overflows, where x =
// delta / scale. Nearest: round half away from zero via exact trunc + fraction. Stochastic:
// q = floor(x) + (u < frac(x)), u = (bits >> 8) * 2^-24, so P(round up) = frac(x) to within
// 2^-24 — unbiased — and |x - q| < 1.
template <bool STOCH, bool DIVIDE>
FTTE_ALWAYS_INLINE void quant_cols(const float* nr, const float* br, int64_t c0, int64_t n, float scale, float inv,
                                   float L, RowKey key, int8_t* dst) {
  const float hi = L + 1.0f;  // keeps the int conversion defined; only tiny DIVIDE rows get near it
  const int32_t Li = static_cast<int32_t>(L);
  for (int64_t j = 0; j < n; ++j) {
    float d = nr[c0 + j] - br[c0 + j];
    float x = DIVIDE ? d / scale : d * inv;
    // The clamp also makes x a min/max rather than a bare product, so GCC (which contracts
    // a*b - c into an FMA by default under -std=gnu++17) cannot fuse d*inv into the fraction
    // below; that would round x one way for the truncation and another for the fraction.
    // Checked: -O0, -O3, -O3 -march=x86-64-v3/znver3 and both target clones give the same bytes.
    x = x > hi ? hi : x;
    x = x < -hi ? -hi : x;
    int32_t t = static_cast<int32_t>(x);  // truncates toward zero
    if (STOCH) {
      t -= static_cast<float>(t) > x;  // floor
      float fr = x - static_cast<float>(t);
      uint32_t bits = col_bits(key, static_cast<uint32_t>(c0 + j));
      float u = static_cast<float>(static_cast<int32_t>(bits >> 8)) * 0x1p-24f;
      t += u < fr;
    } else {
      float fr = x - static_cast<float>(t);  // exact, sign of x
      t += static_cast<int32_t>(fr >= 0.5f) - static_cast<int32_t>(fr <= -0.5f);
    }
    t = t > Li ? Li : t;
    t = t < -Li ? -Li : t;
    dst[j] = static_cast<int8_t>(t);
  }
}

template <bool STOCH>
FTTE_ALWAYS_INLINE void quant_dispatch(const float* nr, const float* br, int64_t c0, int64_t n, float scale,
                                       float inv, bool divide, float L, RowKey key, int8_t* dst) {
  if (divide)
    quant_cols<STOCH, true>(nr, br, c0, n, scale, inv, L, key, dst);
  else
    quant_cols<STOCH, false>(nr, br, c0, n, scale, inv, L, key, dst);
}

// Scale for a row with absmax m; returns false (q must be 0) when the scale is 0.
inline bool row_scale(float m, float L, float* scale, float* inv, bool* divide) {
  *scale = m / L;
  if (*scale == 0.0f) return false;
  *inv = 1.0f / *scale;
  *divide = !(*inv <= FLT_MAX);
  return true;
}

constexpr int64_t kChunk = 512;  // int4 staging chunk (even, so byte boundaries align)

inline int64_t rows_per_task(int64_t F) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1)); }

// Rows [r0, r1). Returns the first non-finite row in the block, or -1.
FTTE_VECTOR_CLONES
int64_t encode_block(const float* newp, const float* base, const int32_t* rows, int64_t r0, int64_t r1, int64_t F,
                     void* qv, bool int4, float* scales, bool stochastic, uint64_t seed) {
  const float L = int4 ? 7.0f : 127.0f;
  const int64_t Fb = int4 ? (F + 1) / 2 : F;
  for (int64_t r = r0; r < r1; ++r) {
    const float* nr = newp + (rows ? rows[r] : r) * F;
    const float* br = base + r * F;
    bool finite;
    float m = row_absmax(nr, br, F, &finite);
    if (!finite) return r;
    float scale = 0.0f, inv = 0.0f;
    bool divide = false;
    bool nonzero = row_scale(m, L, &scale, &inv, &divide);
    scales[r] = scale;
    RowKey key = stochastic ? row_key(seed, r) : RowKey{0, 0};
    if (!int4) {
      int8_t* qr = static_cast<int8_t*>(qv) + r * F;
      if (!nonzero)
        std::memset(qr, 0, static_cast<size_t>(F));
      else if (stochastic)
        quant_dispatch<true>(nr, br, 0, F, scale, inv, divide, L, key, qr);
      else
        quant_dispatch<false>(nr, br, 0, F, scale, inv, divide, L, key, qr);
      continue;
    }
    uint8_t* qr = static_cast<uint8_t*>(qv) + r * Fb;
    if (!nonzero) {
      std::memset(qr, 0, static_cast<size_t>(Fb));
      continue;
    }
    // Quantize a chunk into a small stack buffer, then pack pairs of nibbles.
    int8_t buf[kChunk];
    for (int64_t c0 = 0; c0 < F; c0 += kChunk) {
      int64_t n = std::min(kChunk, F - c0);
      if (stochastic)
        quant_dispatch<true>(nr, br, c0, n, scale, inv, divide, L, key, buf);
      else
        quant_dispatch<false>(nr, br, c0, n, scale, inv, divide, L, key, buf);
      uint8_t* out = qr + c0 / 2;
      int64_t pairs = n / 2;
      for (int64_t i = 0; i < pairs; ++i)
        out[i] = static_cast<uint8_t>((static_cast<uint8_t>(buf[2 * i]) & 0x0F) |
                                      (static_cast<uint8_t>(buf[2 * i + 1]) << 4));
      if (n & 1) out[pairs] = static_cast<uint8_t>(buf[n - 1]) & 0x0F;  // odd F: high nibble stays 0
    }
  }
  return -1;
}

int64_t encode_any(const float* newp, const float* base, const int32_t* rows, int64_t R, int64_t F, void* q,
                   bool int4, float* scales, bool stochastic, uint64_t seed) {
  const int64_t bs = rows_per_task(F);
  const int64_t ntasks = (R + bs - 1) / bs;
  std::atomic<int64_t> first_bad{INT64_MAX};
  parallel_for(
      ntasks,
      [&](int64_t t) {
        int64_t r0 = t * bs, r1 = std::min(R, r0 + bs);
        int64_t bad = encode_block(newp, base, rows, r0, r1, F, q, int4, scales, stochastic, seed);
        if (bad >= 0) {
          int64_t cur = first_bad.load();
          while (bad < cur && !first_bad.compare_exchange_weak(cur, bad)) {
          }
        }
      },
      static_cast<double>(R) * static_cast<double>(F) * (stochastic ? 30.0 : 8.0));
  int64_t bad = first_bad.load();
  return bad == INT64_MAX ? -1 : bad;
}

FTTE_VECTOR_CLONES
void decode_block_int8(const int8_t* q, const float* scales, int64_t r0, int64_t r1, int64_t F, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const float s = scales[r];
    const int8_t* qr = q + r * F;
    float* o = out + r * F;
    for (int64_t c = 0; c < F; ++c) o[c] = static_cast<float>(qr[c]) * s;
  }
}

FTTE_VECTOR_CLONES
void decode_block_int4(const uint8_t* q, const float* scales, int64_t r0, int64_t r1, int64_t F, float* out) {
  const int64_t Fb = (F + 1) / 2, pairs = F / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float s = scales[r];
    const uint8_t* qr = q + r * Fb;
    float* o = out + r * F;
    for (int64_t i = 0; i < pairs; ++i) {
      // Sign-extend each nibble: shift it to the top of an int8, then arithmetic-shift back.
      int8_t lo = static_cast<int8_t>(static_cast<uint8_t>(qr[i] << 4)) >> 4;
      int8_t hi = static_cast<int8_t>(qr[i]) >> 4;
      o[2 * i] = static_cast<float>(lo) * s;
      o[2 * i + 1] = static_cast<float>(hi) * s;
    }
    if (F & 1) o[F - 1] = static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(qr[pairs] << 4)) >> 4) * s;
  }
}

}  // namespace

uint32_t codec_random_bits(uint64_t seed, int64_t r, int64_t c) {
  return col_bits(row_key(seed, r), static_cast<uint32_t>(c));
}

int64_t encode_int8(const float* newp, const float* base, const int32_t* rows, int64_t R, int64_t F, int8_t* q,
                    float* scales, bool stochastic, uint64_t seed) {
  return encode_any(newp, base, rows, R, F, q, false, scales, stochastic, seed);
}

int64_t encode_int4(const float* newp, const float* base, const int32_t* rows, int64_t R, int64_t F, uint8_t* q,
                    float* scales, bool stochastic, uint64_t seed) {
  return encode_any(newp, base, rows, R, F, q, true, scales, stochastic, seed);
}

void decode_int8(const int8_t* q, const float* scales, int64_t R, int64_t F, float* out) {
  const int64_t bs = rows_per_task(F);
  parallel_for(
      (R + bs - 1) / bs, [&](int64_t t) { decode_block_int8(q, scales, t * bs, std::min(R, t * bs + bs), F, out); },
      static_cast<double>(R) * static_cast<double>(F));
}

void decode_int4(const uint8_t* q, const float* scales, int64_t R, int64_t F, float* out) {
  const int64_t bs = rows_per_task(F);
  parallel_for(
      (R + bs - 1) / bs, [&](int64_t t) { decode_block_int4(q, scales, t * bs, std::min(R, t * bs + bs), F, out); },
      static_cast<double>(R) * static_cast<double>(F) * 2.0);
}

}  // namespace ftte

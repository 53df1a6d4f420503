// Delta codec: delta = new[rows[r]] - base[r], quantized with one float32 scale per row.
// int8 uses levels [-127, 127] (scale = max|delta| / 127); int4 uses [-7, 7] (scale = max / 7),
// packed two per byte: element 2i in the low nibble, 2i+1 in the high nibble, two's complement.
// Pure C++ (no pybind11): the bindings validate every pointer and shape before calling in.
#pragma once
#include "vectorize.h"
#include <cstdint>

namespace ftte {

// Hash behind stochastic rounding, exposed so tests can mirror it: a counter-based generator
// keyed by (seed, r, c), r = position in `rows` (0..R-1), c = column. Returns 32 random bits;
// the rounding draw is u = (bits >> 8) * 2^-24, uniform on [0, 1).
uint32_t codec_random_bits(uint64_t seed, int64_t r, int64_t c);

// Encoders return -1 on success, or the smallest r whose delta holds a NaN/Inf (then q and
// scales hold garbage). rows == nullptr means row r of `newp` (R must then equal new's rows).
int64_t encode_int8(const float* newp, const float* base, const int32_t* rows, int64_t R, int64_t F,
                    int8_t* q, float* scales, bool stochastic, uint64_t seed);
int64_t encode_int4(const float* newp, const float* base, const int32_t* rows, int64_t R, int64_t F,
                    uint8_t* q, float* scales, bool stochastic, uint64_t seed);  // q: [R, (F+1)/2]

// out = q * scale, row by row (scales are checked finite by the caller).
void decode_int8(const int8_t* q, const float* scales, int64_t R, int64_t F, float* out);
void decode_int4(const uint8_t* q, const float* scales, int64_t R, int64_t F, float* out);

}  // namespace ftte

#if defined(__GNUC__)
#define FTTE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FTTE_ALWAYS_INLINE inline
#endif

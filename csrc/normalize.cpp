// Frozen-statistics batch norm. Tasks are fixed (one per (n, c) plane forward, one per selected
// channel for the parameter gradients) and every sum runs n outer, s inner (in 8 fixed lanes) in
// one thread, so the thread count never changes a bit.
#include "normalize.h"

#include <cmath>

#include "parallel.h"

namespace ftte {

namespace {
inline float inv_std(float var, float eps) { return 1.f / std::sqrt(var + eps); }

// Sums in 8 fixed lanes, combined in a fixed order: the compiler can vectorise them (a single
// running float sum it may not reorder), and the grouping is the same on every machine.
float sum_lanes(const float* d, int64_t S) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t s = 0;
  for (; s + 8 <= S; s += 8)
    for (int k = 0; k < 8; ++k) acc[k] += d[s + k];
  float tail = 0.f;
  for (; s < S; ++s) tail += d[s];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// sum d[s] * (x[s] - m), in lanes as sum_lanes.
float centered_dot_lanes(const float* d, const float* x, float m, int64_t S) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t s = 0;
  for (; s + 8 <= S; s += 8)
    for (int k = 0; k < 8; ++k) acc[k] += d[s + k] * (x[s + k] - m);
  float tail = 0.f;
  for (; s < S; ++s) tail += d[s] * (x[s] - m);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}
}  // namespace

void batchnorm_forward(const float* x, const float* scale, const float* shift, const float* mean, const float* var,
                       float eps, float* y, int64_t N, int64_t C, int64_t S) {
  parallel_for(
      N * C,
      [&](int64_t t) {
        const int64_t c = t % C;
        const float a = scale[c] * inv_std(var[c], eps), m = mean[c], b = shift[c];
        const float* xp = x + t * S;
        float* yp = y + t * S;
#pragma GCC ivdep
        for (int64_t s = 0; s < S; ++s) yp[s] = (xp[s] - m) * a + b;
      },
      2.0 * static_cast<double>(N * C * S));
}

void batchnorm_backward(const float* x, const float* scale, const float* mean, const float* var, float eps,
                        const float* dy, int64_t N, int64_t C, int64_t S, const int32_t* rows, int64_t R,
                        float* dscale, float* dshift, float* dx, bool accumulate) {
  // Parameter gradients first: dx may be dy itself.
  if ((dscale || dshift) && R > 0) {
    parallel_for(
        R,
        [&](int64_t r) {
          const int64_t c = rows ? rows[r] : r;
          const float m = mean[c];
          float gs = 0.f, gb = 0.f;
          for (int64_t n = 0; n < N; ++n) {
            const float* d = dy + (n * C + c) * S;
            if (dscale) gs += centered_dot_lanes(d, x + (n * C + c) * S, m, S);
            if (dshift) gb += sum_lanes(d, S);
          }
          gs *= inv_std(var[c], eps);
          if (dscale) dscale[r] = accumulate ? dscale[r] + gs : gs;
          if (dshift) dshift[r] = accumulate ? dshift[r] + gb : gb;
        },
        3.0 * static_cast<double>(N * R * S));
  }
  if (dx) {
    parallel_for(
        N * C,
        [&](int64_t t) {
          const int64_t c = t % C;
          const float a = scale[c] * inv_std(var[c], eps);
          const float* d = dy + t * S;
          float* o = dx + t * S;
#pragma GCC ivdep
          for (int64_t s = 0; s < S; ++s) o[s] = d[s] * a;
        },
        static_cast<double>(N * C * S));
  }
}

}  // namespace ftte

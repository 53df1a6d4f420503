// Frozen-statistics batch norm. Tasks are fixed (one per (n, c) plane forward, one per selected
// channel for the parameter gradients) and every sum runs n outer, s inner in one thread, so the
// thread count never changes a bit.
#include "normalize.h"

#include <cmath>

#include "parallel.h"

namespace ftte {

namespace {
inline float inv_std(float var, float eps) { return 1.f / std::sqrt(var + eps); }
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
            float ps = 0.f, pb = 0.f;
            if (dscale) {
              const float* xp = x + (n * C + c) * S;
              for (int64_t s = 0; s < S; ++s) ps += d[s] * (xp[s] - m);
            }
            if (dshift)
              for (int64_t s = 0; s < S; ++s) pb += d[s];
            gs += ps;
            gb += pb;
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

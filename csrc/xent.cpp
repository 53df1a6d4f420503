// Softmax cross-entropy. One row per task; per-row losses are summed afterwards in row order,
// so the loss is the same for any thread count.
#include "xent.h"

#include <cmath>

#include "parallel.h"
#include "workspace.h"

namespace ftte {

double softmax_xent_forward(int64_t N, int64_t C, const float* logits, const int32_t* labels, float* probs) {
  Scratch<double> row_loss(static_cast<size_t>(N));
  parallel_for(
      N,
      [&](int64_t n) {
        const float* z = logits + n * C;
        float* p = probs + n * C;
        float m = z[0];
        for (int64_t c = 1; c < C; ++c) m = z[c] > m ? z[c] : m;
        // Read the label's logit before probs (possibly the same buffer) overwrites it.
        const float z_label = z[labels[n]] - m;
        float s = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          p[c] = std::exp(z[c] - m);  // <= 1 after subtracting the max: no overflow
          s += p[c];
        }
        const float inv = 1.f / s;
        for (int64_t c = 0; c < C; ++c) p[c] *= inv;
        // -log softmax = log(sum) - (z - max); s >= 1, so the log is finite even when p underflows.
        row_loss[static_cast<size_t>(n)] = std::log(static_cast<double>(s)) - static_cast<double>(z_label);
      },
      25.0 * N * C);
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) total += row_loss[static_cast<size_t>(n)];
  return total / static_cast<double>(N);
}

void softmax_xent_backward(int64_t N, int64_t C, const float* probs, const int32_t* labels, float* dlogits,
                           float scale) {
  parallel_for(
      N,
      [&](int64_t n) {
        const float* p = probs + n * C;
        float* d = dlogits + n * C;
        const int64_t label = labels[n];
        for (int64_t c = 0; c < C; ++c) d[c] = ((c == label ? p[c] - 1.f : p[c])) * scale;
      },
      2.0 * N * C);
}

}  // namespace ftte

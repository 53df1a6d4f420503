// SGD on selected rows. The gradient and velocity buffers hold only the R trained rows, so row
// r of them belongs to parameter row rows[r]. Element-wise, so any split is deterministic.
#include "optim.h"

#include <algorithm>

#include "vectorize.h"
#include "parallel.h"

namespace ftte {
namespace {

// One row: separate restrict-qualified loops so the compiler vectorises them (the three
// buffers never overlap: the binding checks it).
FTTE_VECTOR_CLONES
void sgd_row(float* __restrict p, const float* __restrict g, float* __restrict v, int64_t F, float lr,
             float momentum, float weight_decay) {
  if (v) {
    for (int64_t f = 0; f < F; ++f) {
      const float vf = momentum * v[f] + (g[f] + weight_decay * p[f]);
      v[f] = vf;
      p[f] -= lr * vf;
    }
  } else {
    for (int64_t f = 0; f < F; ++f) p[f] -= lr * (g[f] + weight_decay * p[f]);
  }
}

}  // namespace

void sgd_update_rows(float* param, int64_t O, int64_t F, const int32_t* rows, int64_t R, const float* grad,
                     float* velocity, float lr, float momentum, float weight_decay) {
  (void)O;  // rows were range-checked against O by the binding
  constexpr int64_t kRowsPerTask = 16;
  const int64_t n_tasks = (R + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(
      n_tasks,
      [&](int64_t t) {
        const int64_t r1 = std::min<int64_t>(R, (t + 1) * kRowsPerTask);
        for (int64_t r = t * kRowsPerTask; r < r1; ++r)
          sgd_row(param + (rows ? rows[r] : r) * F, grad + r * F, momentum != 0.f ? velocity + r * F : nullptr, F,
                  lr, momentum, weight_decay);
      },
      4.0 * double(R) * double(F));
}

int64_t grad_tile_rows(int64_t R, int64_t row_elems, int64_t cap_bytes) {
  if (R <= 0) return 0;
  const int64_t g = kGradTileRowGranule;
  const int64_t row_bytes = std::max<int64_t>(1, row_elems) * int64_t(sizeof(float));
  const int64_t widest = std::max(kGradTileMinRows, cap_bytes / row_bytes / g * g);
  if (R <= widest) return R;
  const int64_t tiles = (R + widest - 1) / widest, even = (R + tiles - 1) / tiles;
  return (even + g - 1) / g * g;  // <= widest: widest is a multiple of the granule
}

}  // namespace ftte

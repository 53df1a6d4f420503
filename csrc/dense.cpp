// Dense layer forward and backward. Everything heavy is one sgemm; the selected-rows backward
// reads dy's chosen columns through the GEMM's index gather instead of copying them out.
#include "dense.h"

#include <algorithm>

#include "gemm.h"
#include "workspace.h"

namespace ftte {

void dense_forward(const float* x, const WeightView& w, const float* b, float* y, int64_t N, int64_t I, int64_t O) {
  // y = x @ w^T: B = w read transposed, so W keeps its natural [O,I] layout.
  sgemm(N, O, I, 1.f, GemmOperand{x, I}, w.operand(I, true), 0.f, y, O);
  if (b) {
    for (int64_t n = 0; n < N; ++n) {
      float* yr = y + n * O;
      for (int64_t o = 0; o < O; ++o) yr[o] += b[o];
    }
  }
}

void dense_backward(const float* x, const WeightView& w, const float* dy, int64_t N, int64_t I, int64_t O,
                    const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate) {
  const float beta = accumulate ? 1.f : 0.f;
  // dw[r, :] = sum_n dy[n, rows[r]] * x[n, :]  ==  op(A) = dy^T with rows gathered, B = x.
  if (dw) sgemm(R, I, N, 1.f, GemmOperand{dy, O, true, rows}, GemmOperand{x, I}, beta, dw, I);
  if (db && R > 0) {
    // n outer, r inner: a fixed summation order (deterministic) over a contiguous row.
    Scratch<float> acc(static_cast<size_t>(R));
    std::fill(acc.data(), acc.data() + R, 0.f);
    for (int64_t n = 0; n < N; ++n) {
      const float* d = dy + n * O;
      if (rows)
        for (int64_t r = 0; r < R; ++r) acc[r] += d[rows[r]];
      else
        for (int64_t r = 0; r < R; ++r) acc[r] += d[r];
    }
    for (int64_t r = 0; r < R; ++r) db[r] = accumulate ? db[r] + acc[r] : acc[r];
  }
  // dx = dy @ w: every output feeds dx, whatever rows train.
  if (dx) sgemm(N, I, O, 1.f, GemmOperand{dy, O}, w.operand(I), 0.f, dx, I);
}

}  // namespace ftte

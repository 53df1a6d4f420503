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

namespace {

// acc[r] = sum over n (in order) of dy[n, rows[r]]: a fixed summation order (deterministic) over
// a contiguous row.
void bias_gradient(const float* dy, int64_t N, int64_t O, const int32_t* rows, int64_t R, float* acc) {
  std::fill(acc, acc + R, 0.f);
  for (int64_t n = 0; n < N; ++n) {
    const float* d = dy + n * O;
    if (rows)
      for (int64_t r = 0; r < R; ++r) acc[r] += d[rows[r]];
    else
      for (int64_t r = 0; r < R; ++r) acc[r] += d[r];
  }
}

}  // namespace

void dense_backward(const float* x, const WeightView& w, const float* dy, int64_t N, int64_t I, int64_t O,
                    const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate) {
  const float beta = accumulate ? 1.f : 0.f;
  // dw[r, :] = sum_n dy[n, rows[r]] * x[n, :]  ==  op(A) = dy^T with rows gathered, B = x.
  if (dw) sgemm(R, I, N, 1.f, GemmOperand{dy, O, true, rows}, GemmOperand{x, I}, beta, dw, I);
  if (db && R > 0) {
    Scratch<float> acc(static_cast<size_t>(R));
    bias_gradient(dy, N, O, rows, R, acc.data());
    for (int64_t r = 0; r < R; ++r) db[r] = accumulate ? db[r] + acc[r] : acc[r];
  }
  // dx = dy @ w: every output feeds dx, whatever rows train.
  if (dx) sgemm(N, I, O, 1.f, GemmOperand{dy, O}, w.operand(I), 0.f, dx, I);
}

void dense_backward_sgd(const float* x, const WeightView& w, float* b, const float* dy, int64_t N, int64_t I,
                        int64_t O, const int32_t* rows, int64_t R, float* dx, bool train_bias, float* vw, float* vb,
                        const SgdStep& opt) {
  // dx first: it must read the weights as forward used them, before any row moves.
  if (dx) sgemm(N, I, O, 1.f, GemmOperand{dy, O}, w.operand(I), 0.f, dx, I);
  if (train_bias && O > 0) {
    Scratch<float> db(static_cast<size_t>(O));
    bias_gradient(dy, N, O, nullptr, O, db.data());
    sgd_update_rows(b, O, 1, nullptr, O, db.data(), vb, opt.lr, opt.momentum, opt.weight_decay);
  }
  if (R <= 0) return;
  // Tile by tile: dW rows r0..r0+t as one sgemm into the tile, applied while still in cache.
  // Each dW element sums over the batch exactly as the untiled sgemm would (work is split over
  // C only), so the update equals dense_backward + sgd_update_rows.
  const int64_t T = grad_tile_rows(R, I, kDenseGradTileBytes);
  Scratch<float> tile(static_cast<size_t>(T * I));
  float* wf = const_cast<float*>(w.f);  // the rows that train: the binding checked them writable
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    const int64_t t = std::min(T, R - r0);
    // All rows: the tile's rows are dy's columns r0.. (an offset, no gather).
    const GemmOperand a = rows ? GemmOperand{dy, O, true, rows + r0} : GemmOperand{dy + r0, O, true};
    sgemm(t, I, N, 1.f, a, GemmOperand{x, I}, 0.f, tile.data(), I);
    float* vt = opt.momentum != 0.f ? vw + r0 * I : nullptr;
    if (w.mixed())  // trained row rows[r] is compact row r: the tile's rows are rows r0.. of w.f
      sgd_update_rows(wf + r0 * I, t, I, nullptr, t, tile.data(), vt, opt.lr, opt.momentum, opt.weight_decay);
    else
      sgd_update_rows(rows ? wf : wf + r0 * I, O, I, rows ? rows + r0 : nullptr, t, tile.data(), vt, opt.lr,
                      opt.momentum, opt.weight_decay);
  }
}

size_t dense_backward_sgd_scratch_bytes(int64_t N, int64_t I, int64_t O, int64_t R, bool gather, bool train_bias,
                                        bool want_dx, bool int8_weight) {
  const float* any = nullptr;
  static const int32_t some_rows[1] = {0};
  static const int8_t some_q[1] = {0};  // only whether w is packed like int8 matters for sizing
  size_t peak = 0;
  if (want_dx)
    peak = sgemm_scratch_bytes(N, I, O, GemmOperand{any, O}, GemmOperand{any, I, false, nullptr, int8_weight ? some_q : nullptr});
  if (train_bias) peak = std::max(peak, static_cast<size_t>(O) * sizeof(float));
  if (R > 0) {
    const int64_t T = grad_tile_rows(R, I, kDenseGradTileBytes), last = R - (R - 1) / T * T;
    size_t pack = 0;
    for (int64_t t : {T, last})
      pack = std::max(pack, sgemm_scratch_bytes(t, I, N, GemmOperand{any, O, true, gather ? some_rows : nullptr},
                                                GemmOperand{any, I}));
    peak = std::max(peak, static_cast<size_t>(T * I) * sizeof(float) + pack);
  }
  return peak;
}

}  // namespace ftte

// Dense (fully connected) layer, y = x W^T + b, with a backward that computes weight/bias
// gradients only for selected output rows, straight into R-row buffers.
#pragma once
#include <cstddef>
#include <cstdint>

#include "gemm.h"
#include "optim.h"

namespace ftte {

// x[N,I], w[O,I] (float32, or int8 with a scale per row), b[O] or nullptr, y[N,O].
void dense_forward(const float* x, const WeightView& w, const float* b, float* y, int64_t N, int64_t I, int64_t O);

// dy[N,O]. rows[R] selects output rows (nullptr: identity, caller passes R == O). dw[R,I], db[R], dx[N,I]; any may
// be nullptr. accumulate adds into dw/db; dx is always overwritten with dy @ w (all rows; w is only read for dx).
void dense_backward(const float* x, const WeightView& w, const float* dy, int64_t N, int64_t I, int64_t O,
                    const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate);

// One training step's backward and SGD update of a dense layer, with no gradient buffer: dx[N,I]
// (may be nullptr) = dy @ w from the weights before the update; then, when train_bias, the whole
// bias b[O] is updated from its gradient (O floats of scratch); then the selected rows rows[R]
// (nullptr: all, R == O; unique) of w[O,I] are updated tile by tile: each tile of at most
// kDenseGradTileBytes of dW rows is computed by one sgemm and applied at once (velocity rows
// vw[R,I] and vb[O] only when momentum != 0). Same numbers as dense_backward + sgd_update_rows.
// w is float32 (updated in place), or mixed (WeightView::mixed: rows given, row_slot[rows[r]] == r)
// with the update landing in its compact float rows w.f (writable: the caller checked); never
// whole-int8 (nothing of it trains).
constexpr int64_t kDenseGradTileBytes = 32 * 1024;
void dense_backward_sgd(const float* x, const WeightView& w, float* b, const float* dy, int64_t N, int64_t I, int64_t O,
                        const int32_t* rows, int64_t R, float* dx, bool train_bias, float* vw, float* vb,
                        const SgdStep& opt);

// Most scratch bytes dense_backward_sgd holds (weight tile and its GEMM's packing, bias gradient,
// the dx GEMM's packing: never at once, so the largest). `gather`: rows are a strict subset;
// `int8_weight`: w is mixed (packed like an int8 operand for dx).
size_t dense_backward_sgd_scratch_bytes(int64_t N, int64_t I, int64_t O, int64_t R, bool gather, bool train_bias,
                                        bool want_dx, bool int8_weight = false);

}  // namespace ftte

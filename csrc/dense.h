// Dense (fully connected) layer, y = x W^T + b, with a backward that computes weight/bias
// gradients only for selected output rows, straight into R-row buffers.
#pragma once
#include <cstdint>

#include "gemm.h"

namespace ftte {

// x[N,I], w[O,I] (float32, or int8 with a scale per row), b[O] or nullptr, y[N,O].
void dense_forward(const float* x, const WeightView& w, const float* b, float* y, int64_t N, int64_t I, int64_t O);

// dy[N,O]. rows[R] selects output rows (nullptr: identity, caller passes R == O). dw[R,I], db[R], dx[N,I]; any may
// be nullptr. accumulate adds into dw/db; dx is always overwritten with dy @ w (all rows; w is only read for dx).
void dense_backward(const float* x, const WeightView& w, const float* dy, int64_t N, int64_t I, int64_t O,
                    const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate);

}  // namespace ftte

// Batch normalization with frozen (inference) statistics over channel axis 1 of [N, C, S...]
// (S = product of the trailing dims, 1 for [N, C]). scale and shift are the trainable
// per-channel parameters; the backward computes their gradients only for selected channels,
// straight into R-entry buffers, as the masked dense/conv kernels do for output rows.
#pragma once
#include <cstdint>

namespace ftte {

// y = scale * (x - mean) / sqrt(var + eps) + shift, per channel. y may be x (in place).
void batchnorm_forward(const float* x, const float* scale, const float* shift, const float* mean, const float* var,
                       float eps, float* y, int64_t N, int64_t C, int64_t S);

// dy[N,C,S]. rows[R] selects channels (nullptr: all, R == C). dscale[R], dshift[R], dx[N,C,S]: any may be nullptr.
// x is read only for dscale. accumulate adds into dscale/dshift; dx (which may be dy itself) is overwritten,
// dx = dy * scale / sqrt(var + eps) over all channels.
void batchnorm_backward(const float* x, const float* scale, const float* mean, const float* var, float eps,
                        const float* dy, int64_t N, int64_t C, int64_t S, const int32_t* rows, int64_t R,
                        float* dscale, float* dshift, float* dx, bool accumulate);

}  // namespace ftte

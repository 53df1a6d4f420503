// Depthwise 2-D convolution (group == C, channel multiplier M) as a direct kernel, and grouped
// convolution (1 <= group, C and OC divisible by it) as im2col + sgemm per group, NCHW float32.
// Backward restricts weight/bias gradients to selected output channels ("rows"), as conv2d does.
// Pure C++: no Python here (cross-compiled on its own).
#pragma once
#include <cstddef>
#include <cstdint>

#include "conv2d.h"

namespace ftte {

// Weights (w) are float32, or int8 with one float32 scale per output channel (WeightView); an int8
// depthwise channel's KH*KW taps are dequantised on the stack as the channel is processed.
//
// Depthwise: g.OC == g.C * M; weight [OC, 1, KH, KW]; output channel oc reads input channel oc / M.
// y[N,OC,OH,OW] = dwconv(x, w) + b   (b may be null). Stride 1 pads each plane into scratch and
// runs every tap as one flat loop (depthwise_conv2d_scratch_bytes); other strides hold none.
void depthwise_conv2d_forward(const ConvGeom& g, const float* x, const WeightView& w, const float* b, float* y);

// Gradients for output channels rows[0..R) (rows == null: all OC, R == OC):
//   dw[R,1,KH,KW], db[R] (each may be null; += when accumulate), and
//   dx[N,C,H,W] (may be null; overwritten; every output channel contributes).
// x may be null when dw is. Repeated rows get the same gradient in each slot.
void depthwise_conv2d_backward(const ConvGeom& g, const float* x, const WeightView& w, const float* dy,
                               const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate);

// Grouped: g.C and g.OC divisible by `group`; weight [OC, C/group, KH, KW]; output channel oc
// reads input channels [(oc / (OC/group)) * (C/group), ... + C/group). group == 1 is conv2d.
void grouped_conv2d_forward(const ConvGeom& g, int64_t group, const float* x, const WeightView& w, const float* b,
                            float* y);

// As conv2d_backward with the grouped weight: dw[R, C/group, KH, KW], db[R], dx[N,C,H,W].
void grouped_conv2d_backward(const ConvGeom& g, int64_t group, const float* x, const WeightView& w, const float* dy,
                             const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate);

// Bytes of scratch grouped_conv2d_forward (backward == false) or grouped_conv2d_backward hold at
// most with `threads` threads, GEMM packing included (exact at one thread), for the cost model.
size_t grouped_conv2d_scratch_bytes(const ConvGeom& g, int64_t group, bool backward, const int32_t* rows, int64_t R,
                                    bool want_dw, bool want_db, bool want_dx, int threads, bool int8_weight = false);

// Bytes of scratch the depthwise kernels hold at most with `threads` threads (exact at one): a
// padded plane and one output plane at the padded pitch per task, stride 1 only.
size_t depthwise_conv2d_scratch_bytes(const ConvGeom& g, bool backward, bool want_dw, bool want_dx, int threads);

}  // namespace ftte

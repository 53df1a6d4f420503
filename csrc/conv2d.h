// 2-D convolution (groups=1, dilation=1) as im2col + sgemm, NCHW float32, with the backward
// restricted to selected output channels ("rows") so a partly-frozen layer only pays for the
// channels that train. Pure C++: no Python here (cross-compiled on its own).
#pragma once
#include <cstddef>
#include <cstdint>

#include "gemm.h"
#include "optim.h"

namespace ftte {

// Output length of a sliding window along one axis, ONNX/PyTorch rules: floor (or ceil) of
// (in + pad_begin + pad_end - k) / stride, plus one; with ceil_mode a last window that would
// start inside the end padding is dropped (what onnxruntime and PyTorch do, so every window
// holds at least one real cell when the padding is smaller than the kernel).
// Returns <= 0 when the padded input is shorter than the kernel.
int64_t window_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad_begin, int64_t pad_end, bool ceil_mode);

struct ConvGeom {
  int64_t N, C, H, W;  // input
  int64_t OC, KH, KW;  // weight [OC, C, KH, KW]
  int64_t sh, sw;      // stride
  int64_t pt, pl, pb, pr;  // padding: top, left, bottom, right
  int64_t OH, OW;      // output
};

// y[N,OC,OH,OW] = conv(x, w) + b   (b may be null; w float32, or int8 with a scale per output channel)
void conv2d_forward(const ConvGeom& g, const float* x, const WeightView& w, const float* b, float* y);

// Gradients for output channels rows[0..R) (rows == null: all OC, R == OC):
//   dw[R,C,KH,KW], db[R] (each may be null; += when accumulate), and
//   dx[N,C,H,W] (may be null; overwritten; every output channel contributes).
// x may be null when dw is.
void conv2d_backward(const ConvGeom& g, const float* x, const WeightView& w, const float* dy, const int32_t* rows,
                     int64_t R, float* dw, float* db, float* dx, bool accumulate);

// Bytes of scratch conv2d_forward (backward == false) or conv2d_backward hold at most, with
// `threads` threads: im2col column tiles (at most 256 KiB per image in flight, see
// kTileBytes in conv2d.cpp), dW partial sums and sgemm's own packing panels. Exact at one
// thread, an upper bound on more. Mirrors the kernels' own choices, for the memory cost model.
// int8_weight: the weight is int8 (its GEMM operand is packed, never read in place).
size_t conv2d_scratch_bytes(const ConvGeom& g, bool backward, int64_t R, bool want_dw, bool want_dx, int threads,
                            bool int8_weight = false);

// One training step's backward and SGD update of the layer, with no gradient buffer (as
// dense_backward_sgd): dx (may be null) from the weights before the update; the whole bias b[OC]
// when train_bias; then the selected output channels rows[R] (nullptr: all; unique) of w, in
// tiles of at most kConvGradTileBytes of dW rows, each accumulated over the whole batch by
// conv2d_backward and applied at once (vw[R,C,KH,KW], vb[OC] only when momentum != 0). A layer
// whose trained rows need several tiles builds its im2col columns once per tile. w is float32
// (updated in place) or mixed (rows given, row_slot[rows[r]] == r: the update lands in its
// compact float rows w.f, writable as the caller checked), as for dense_backward_sgd.
constexpr int64_t kConvGradTileBytes = 256 * 1024;
void conv2d_backward_sgd(const ConvGeom& g, const float* x, const WeightView& w, float* b, const float* dy,
                         const int32_t* rows, int64_t R, float* dx, bool train_bias, float* vw, float* vb,
                         const SgdStep& opt);

// Most scratch bytes conv2d_backward_sgd holds with `threads` threads (exact at one thread);
// int8_weight: w is mixed (its dx operand packed like an int8 one).
size_t conv2d_backward_sgd_scratch_bytes(const ConvGeom& g, int64_t R, bool train_bias, bool want_dx, int threads,
                                         bool int8_weight = false);

}  // namespace ftte

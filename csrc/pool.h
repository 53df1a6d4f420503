// Max / average / global-average pooling, NCHW float32, ONNX (= onnxruntime = PyTorch)
// semantics. Pure C++: no Python here.
#pragma once
#include <cstdint>

namespace ftte {

struct PoolGeom {
  int64_t N, C, H, W;
  int64_t KH, KW, sh, sw;
  int64_t pt, pl, pb, pr;  // padding: top, left, bottom, right; each < its kernel size
  int64_t OH, OW;          // from window_out_size (conv2d.h)
};

// argmax (may be null) gets the flat index h*W + w of the max inside its input plane; the
// first max wins ties and padding never wins (it is not a value at all, not -inf).
void maxpool2d_forward(const PoolGeom& g, const float* x, float* y, int32_t* argmax);
// dx[planes, HW] = 0, then dx[p, argmax[p, o]] += dy[p, o]; argmax values must be in [0, HW).
void maxpool2d_backward(int64_t planes, int64_t HW, int64_t OHW, const float* dy, const int32_t* argmax, float* dx);
// The same with the max's position INSIDE its window, (ih - oh*sh + pt)*KW + (iw - ow*sw + pl)
// in [0, KH*KW): a training step keeps one byte per output instead of four (KH*KW <= 256). Same
// values, same ties; backward adds in the same order, so dx is bit-identical to the int32 pair's.
void maxpool2d_forward_window(const PoolGeom& g, const float* x, float* y, uint8_t* argmax);
// argmax values must name a real (non-pad) cell of their window.
void maxpool2d_backward_window(const PoolGeom& g, const float* dy, const uint8_t* argmax, float* dx);

// Divisor: real (non-pad) cells in the window, or with count_include_pad the window clipped
// to the padded input (so ceil_mode windows running past the end padding are clipped too).
void avgpool2d_forward(const PoolGeom& g, const float* x, float* y, bool count_include_pad);
void avgpool2d_backward(const PoolGeom& g, const float* dy, float* dx, bool count_include_pad);

// y[p] = mean of plane p (HW cells); dx[p, :] = dy[p] / HW.
void global_avgpool_forward(int64_t planes, int64_t HW, const float* x, float* y);
void global_avgpool_backward(int64_t planes, int64_t HW, const float* dy, float* dx);

}  // namespace ftte

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

// ReLU fused into the max-pool that is its only reader: the pool of relu(x), relu applied as the
// cells load (relu(x) = x > 0 ? x : +0, so a NaN x counts as +0), with the same first-max rule, so
// y and every argmax of a positive output are those of relu_forward then maxpool2d_forward_window.
// Where the output is +0 (no cell of the window above 0) argmax gets kReluPoolGated instead: ReLU's
// gradient is 0 at whichever cell won, so backward writes +0 over the whole window there. Windows
// of at most 255 cells (255 is the sentinel); argmax may be null (a frozen forward).
constexpr uint8_t kReluPoolGated = 255;
void maxpool2d_relu_forward_window(const PoolGeom& g, const float* x, float* y, uint8_t* argmax);
// Bit-identical to relu_backward_mask(mask of x, maxpool2d_backward_window(dy, argmax of relu(x))):
// a positive output's cell has x > 0, so its gate is on and dx there is what the pool scatters.
void maxpool2d_relu_backward_window(const PoolGeom& g, const float* dy, const uint8_t* argmax, float* dx);

// Divisor: real (non-pad) cells in the window, or with count_include_pad the window clipped
// to the padded input (so ceil_mode windows running past the end padding are clipped too).
void avgpool2d_forward(const PoolGeom& g, const float* x, float* y, bool count_include_pad);
void avgpool2d_backward(const PoolGeom& g, const float* dy, float* dx, bool count_include_pad);

// y[p] = mean of plane p (HW cells); dx[p, :] = dy[p] / HW.
void global_avgpool_forward(int64_t planes, int64_t HW, const float* x, float* y);
void global_avgpool_backward(int64_t planes, int64_t HW, const float* dy, float* dx);

}  // namespace ftte

// Elementwise activations over n floats. Outputs may alias inputs (in-place), so each element
// is read before its slot is written. Backward takes the forward OUTPUT y, which is what a
// training step keeps anyway (and lets ReLU run in place). Pure C++: no Python here.
#pragma once
#include <cstdint>

namespace ftte {

void relu_forward(int64_t n, const float* x, float* y);                     // y = max(x, 0)
void relu_backward(int64_t n, const float* y, const float* dy, float* dx);  // dx = dy * (y > 0)
// ReLU that keeps one bit per element for backward instead of the float output (a 32x smaller
// saved state). mask holds ceil(n/8) bytes; bit k of byte i is element 8*i+k (NumPy's
// packbits(..., bitorder="little")), set where x > 0 (so a NaN x gives y = 0 and bit 0, like
// relu_forward/relu_backward); unused bits of the last byte are 0. y may be x; mask shares no
// memory with x, y, dy or dx.
void relu_forward_mask(int64_t n, const float* x, float* y, uint8_t* mask);
void relu_backward_mask(int64_t n, const uint8_t* mask, const float* dy, float* dx);  // dx = dy where bit set, else 0
void sigmoid_forward(int64_t n, const float* x, float* y);                  // y = 1 / (1 + e^-x)
void sigmoid_backward(int64_t n, const float* y, const float* dy, float* dx);  // dx = dy * y * (1 - y)
void tanh_forward(int64_t n, const float* x, float* y);
void tanh_backward(int64_t n, const float* y, const float* dy, float* dx);  // dx = dy * (1 - y^2)

// Parametrised activations (ONNX LeakyRelu, HardSigmoid, Clip, HardSwish). Derivatives at the
// kinks follow PyTorch: the gradient is that of the side the strict comparisons below pick.
// y = x if x > 0 else alpha*x. Backward reads the OUTPUT: y > 0 exactly when x > 0 as long as
// alpha > 0 (the binding enforces it), so dx = dy if y > 0 else alpha*dy (x == 0 takes alpha).
void leaky_relu_forward(int64_t n, const float* x, float* y, float alpha);
void leaky_relu_backward(int64_t n, const float* y, const float* dy, float* dx, float alpha);
// y = max(0, min(1, alpha*x + beta)); dx = alpha*dy where 0 < y < 1, else 0 (0 on the bounds).
void hardsigmoid_forward(int64_t n, const float* x, float* y, float alpha, float beta);
void hardsigmoid_backward(int64_t n, const float* y, const float* dy, float* dx, float alpha);
// y = min(max(x, lo), hi), lo <= hi (either may be infinite); dx = dy where lo < y < hi, else 0,
// i.e. 0 exactly on a bound, like PyTorch's hardtanh and relu6 (torch.clamp would pass it).
void clip_forward(int64_t n, const float* x, float* y, float lo, float hi);
void clip_backward(int64_t n, const float* y, const float* dy, float* dx, float lo, float hi);
// y = x * max(0, min(1, x/6 + 1/2)). Backward reads the INPUT x (y does not determine x):
// dx = 0 for x < -3, dy*(x/3 + 1/2) for -3 <= x <= 3, dy for x > 3 (PyTorch's edges; a NaN x
// passes dy through, as PyTorch's branch order does).
void hardswish_forward(int64_t n, const float* x, float* y);
void hardswish_backward(int64_t n, const float* x, const float* dy, float* dx);

}  // namespace ftte

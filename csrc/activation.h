// Elementwise activations over n floats. Outputs may alias inputs (in-place), so each element
// is read before its slot is written. Backward takes the forward OUTPUT y, which is what a
// training step keeps anyway (and lets ReLU run in place). Pure C++: no Python here.
#pragma once
#include <cstdint>

namespace ftte {

void relu_forward(int64_t n, const float* x, float* y);                     // y = max(x, 0)
void relu_backward(int64_t n, const float* y, const float* dy, float* dx);  // dx = dy * (y > 0)
void sigmoid_forward(int64_t n, const float* x, float* y);                  // y = 1 / (1 + e^-x)
void sigmoid_backward(int64_t n, const float* y, const float* dy, float* dx);  // dx = dy * y * (1 - y)
void tanh_forward(int64_t n, const float* x, float* y);
void tanh_backward(int64_t n, const float* y, const float* dy, float* dx);  // dx = dy * (1 - y^2)

}  // namespace ftte

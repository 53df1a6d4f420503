// Elementwise activations. Blocks of fixed size are the parallel tasks; elements are
// independent, so the thread count cannot change a single bit.
#include "activation.h"

#include <algorithm>
#include <cmath>

#include "parallel.h"

namespace ftte {
namespace {

constexpr int64_t kBlock = 16384;

// Runs f(i0, i1) over [0, n) in fixed blocks; flops_per_elem only decides whether threads pay off.
template <class F>
void blocks(int64_t n, double flops_per_elem, const F& f) {
  parallel_for(
      (n + kBlock - 1) / kBlock,
      [&](int64_t t) {
        const int64_t i0 = t * kBlock, i1 = std::min(n, i0 + kBlock);
        f(i0, i1);
      },
      flops_per_elem * static_cast<double>(n));
}

}  // namespace

void relu_forward(int64_t n, const float* x, float* y) {
  blocks(n, 1, [&](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
  });
}

void relu_backward(int64_t n, const float* y, const float* dy, float* dx) {
  blocks(n, 1, [&](int64_t i0, int64_t i1) {
    // ivdep: dx may be dy itself (same index, read before write); the binding rejects partial
    // overlaps. Without it the in-place call falls back to a scalar, branchy loop.
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float d = dy[i];  // an unconditional load lets the select vectorise (no branch)
      dx[i] = y[i] > 0.f ? d : 0.f;
    }
  });
}

void sigmoid_forward(int64_t n, const float* x, float* y) {
  // exp(-x) overflows to inf for x < -88, giving exactly 0: the right limit, no NaN.
  blocks(n, 20, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) y[i] = 1.f / (1.f + std::exp(-x[i]));
  });
}

void sigmoid_backward(int64_t n, const float* y, const float* dy, float* dx) {
  blocks(n, 3, [&](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) dx[i] = dy[i] * y[i] * (1.f - y[i]);
  });
}

void tanh_forward(int64_t n, const float* x, float* y) {
  blocks(n, 20, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) y[i] = std::tanh(x[i]);
  });
}

void tanh_backward(int64_t n, const float* y, const float* dy, float* dx) {
  blocks(n, 3, [&](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) dx[i] = dy[i] * (1.f - y[i] * y[i]);
  });
}

}  // namespace ftte

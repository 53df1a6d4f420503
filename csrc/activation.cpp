// Elementwise activations. Blocks of fixed size are the parallel tasks; elements are
// independent, so the thread count cannot change a single bit.
#include "activation.h"

#include <algorithm>
#include <cmath>

#include "parallel.h"

namespace ftte {
namespace {

constexpr int64_t kBlock = 16384;  // a multiple of 8: a block owns whole mask bytes

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

void relu_forward_mask(int64_t n, const float* x, float* y, uint8_t* mask) {
  blocks(n, 1, [=](int64_t i0, int64_t i1) {
    // i0 is a multiple of 8 (kBlock is), so each block writes its own bytes of the mask.
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      unsigned bits = 0;
      for (int k = 0; k < 8; ++k) {
        const float v = x[i + k];
        const bool on = v > 0.f;
        bits |= static_cast<unsigned>(on) << k;
        y[i + k] = on ? v : 0.f;
      }
      mask[i / 8] = static_cast<uint8_t>(bits);
    }
    if (i < i1) {  // the last, partial byte (only the final block has one); its high bits stay 0
      unsigned bits = 0;
      for (int k = 0; i + k < i1; ++k) {
        const float v = x[i + k];
        const bool on = v > 0.f;
        bits |= static_cast<unsigned>(on) << k;
        y[i + k] = on ? v : 0.f;
      }
      mask[i / 8] = static_cast<uint8_t>(bits);
    }
  });
}

void relu_backward_mask(int64_t n, const uint8_t* mask, const float* dy, float* dx) {
  blocks(n, 1, [=](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      // The byte is read once into a register: uint8_t may alias dx for all the compiler knows.
      const unsigned bits = mask[i / 8];
      for (int k = 0; k < 8; ++k) {
        const float d = dy[i + k];
        dx[i + k] = ((bits >> k) & 1u) ? d : 0.f;
      }
    }
    if (i < i1) {
      const unsigned bits = mask[i / 8];
      for (int k = 0; i + k < i1; ++k) {
        const float d = dy[i + k];
        dx[i + k] = ((bits >> k) & 1u) ? d : 0.f;
      }
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

// NaN inputs stay NaN in every forward below: each comparison with NaN is false, so the
// selects fall through to the arithmetic branch (as np.clip and PyTorch do). The lambdas
// capture by value: a parameter captured by reference might alias the output for all the
// compiler knows, which stops the loops vectorising; `&` rather than `&&` keeps them branchless.

void leaky_relu_forward(int64_t n, const float* x, float* y, float alpha) {
  blocks(n, 2, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      y[i] = v > 0.f ? v : alpha * v;
    }
  });
}

void leaky_relu_backward(int64_t n, const float* y, const float* dy, float* dx, float alpha) {
  blocks(n, 2, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float d = dy[i];
      dx[i] = y[i] > 0.f ? d : alpha * d;
    }
  });
}

void hardsigmoid_forward(int64_t n, const float* x, float* y, float alpha, float beta) {
  blocks(n, 4, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      float t = alpha * x[i] + beta;
      t = t > 1.f ? 1.f : t;
      y[i] = t < 0.f ? 0.f : t;
    }
  });
}

void hardsigmoid_backward(int64_t n, const float* y, const float* dy, float* dx, float alpha) {
  blocks(n, 3, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float v = y[i], d = alpha * dy[i];
      dx[i] = ((v > 0.f) & (v < 1.f)) ? d : 0.f;
    }
  });
}

void clip_forward(int64_t n, const float* x, float* y, float lo, float hi) {
  blocks(n, 2, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      const float t = v < lo ? lo : v;
      y[i] = t > hi ? hi : t;
    }
  });
}

void clip_backward(int64_t n, const float* y, const float* dy, float* dx, float lo, float hi) {
  blocks(n, 2, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float v = y[i], d = dy[i];
      dx[i] = ((v > lo) & (v < hi)) ? d : 0.f;
    }
  });
}

void hardswish_forward(int64_t n, const float* x, float* y) {
  // Written as x*(x+3)/6 between the knees with explicit selects outside, so y is exactly x
  // for x >= 3 and exactly 0 for x <= -3 (x * 1 through the clamp formula would be too, but
  // x*(x+3)/6 is what PyTorch computes in the middle).
  blocks(n, 5, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      const float mid = v * (v + 3.f) / 6.f;
      y[i] = v >= 3.f ? v : (v <= -3.f ? 0.f : mid);
    }
  });
}

void hardswish_backward(int64_t n, const float* x, const float* dy, float* dx) {
  blocks(n, 4, [=](int64_t i0, int64_t i1) {
#pragma GCC ivdep
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i], d = dy[i];
      const float mid = d * (v / 3.f + 0.5f);
      dx[i] = v < -3.f ? 0.f : (v <= 3.f ? mid : d);
    }
  });
}

}  // namespace ftte

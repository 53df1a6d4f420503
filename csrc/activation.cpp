// Elementwise activations. Blocks of fixed size are the parallel tasks; elements are
// independent, so the thread count cannot change a single bit.
#include "activation.h"

#include <algorithm>
#include <cmath>
#include <cstring>

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

namespace {

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, 16);
  return v;
}

// Bit casts between same-size vectors (memcpy: a pointer cast would break strict aliasing).
template <class To, class From>
inline To bits_of(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

// Eight elements at a time as two 4-lane vectors (GCC/Clang vector extensions: SSE2 or NEON):
// the compare gives all-ones lanes, which select the value and one bit each. Branch-free (a
// scalar loop mispredicts half of random signs) and the same for any vector width.
typedef uint32_t v4u __attribute__((vector_size(16)));
const v4i kLowBits = {1, 2, 4, 8}, kHighBits = {16, 32, 64, 128};
const v4u kBits32 = {1u, 2u, 4u, 8u};

inline unsigned relu8(const float* x, float* y) {
  const v4f zero = {0.f, 0.f, 0.f, 0.f};
  const v4f a = load4(x), b = load4(x + 4);  // both loaded before y (which may be x) is written
  const v4i on_a = a > zero, on_b = b > zero;  // false for NaN: y = 0, bit 0, as relu_forward
  const v4i ya = bits_of<v4i>(a) & on_a, yb = bits_of<v4i>(b) & on_b;
  std::memcpy(y, &ya, 16);
  std::memcpy(y + 4, &yb, 16);
  const v4i w = (on_a & kLowBits) | (on_b & kHighBits);
  return static_cast<unsigned>(w[0] | w[1] | w[2] | w[3]);
}

// 32 elements, four mask bytes: the lanes are OR-ed together once per 32 elements rather than
// once per 8 (the horizontal step is what costs).
inline void relu32(const float* x, float* y, uint8_t* mask) {
  const v4f zero = {0.f, 0.f, 0.f, 0.f};
  v4u w = {0u, 0u, 0u, 0u};
  for (int q = 0; q < 8; ++q) {
    const v4f a = load4(x + 4 * q);
    const v4i on = a > zero;
    const v4i ya = bits_of<v4i>(a) & on;
    std::memcpy(y + 4 * q, &ya, 16);
    w |= bits_of<v4u>(on) & (kBits32 << (4u * static_cast<unsigned>(q)));
  }
  const uint32_t bits = w[0] | w[1] | w[2] | w[3];
  for (int j = 0; j < 4; ++j) mask[j] = static_cast<uint8_t>(bits >> (8 * j));  // any byte order
}

inline void relu8_backward(unsigned bits, const float* dy, float* dx) {
  const int32_t b = static_cast<int32_t>(bits);
  const v4i splat = {b, b, b, b}, zero = {0, 0, 0, 0};
  const v4i on_a = (splat & kLowBits) != zero, on_b = (splat & kHighBits) != zero;
  v4i da, db;
  std::memcpy(&da, dy, 16);
  std::memcpy(&db, dy + 4, 16);
  da &= on_a;
  db &= on_b;
  std::memcpy(dx, &da, 16);
  std::memcpy(dx + 4, &db, 16);
}

}  // namespace

void relu_forward_mask(int64_t n, const float* x, float* y, uint8_t* mask) {
  blocks(n, 1, [=](int64_t i0, int64_t i1) {
    // i0 is a multiple of 8 (kBlock is), so each block writes its own bytes of the mask.
    int64_t i = i0;
    for (; i + 32 <= i1; i += 32) relu32(x + i, y + i, mask + i / 8);
    for (; i + 8 <= i1; i += 8) mask[i / 8] = static_cast<uint8_t>(relu8(x + i, y + i));
    if (i < i1) {  // the last, partial byte (only the final block has one): padded copies
      float xs[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, ys[8];
      std::copy(x + i, x + i1, xs);
      mask[i / 8] = static_cast<uint8_t>(relu8(xs, ys));  // spare bits: 0 > 0 is false
      std::copy(ys, ys + (i1 - i), y + i);
    }
  });
}

void relu_backward_mask(int64_t n, const uint8_t* mask, const float* dy, float* dx) {
  blocks(n, 1, [=](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) relu8_backward(mask[i / 8], dy + i, dx + i);
    if (i < i1) {
      float ds[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, dxs[8];
      std::copy(dy + i, dy + i1, ds);
      relu8_backward(mask[i / 8], ds, dxs);
      std::copy(dxs, dxs + (i1 - i), dx + i);
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

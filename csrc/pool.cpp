// Pooling. Every kernel runs one (image, channel) plane per task: planes are independent, so
// the result never depends on the thread count, and backward scatters stay within a plane.
#include "pool.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "workspace.h"

namespace ftte {
namespace {

// Window of output cell o along one axis, clipped to the real input [lo, hi).
struct Span {
  int64_t lo, hi, padded;  // padded: length counted with count_include_pad
};
inline Span window(int64_t o, int64_t k, int64_t s, int64_t pad_begin, int64_t pad_end, int64_t in) {
  int64_t start = o * s - pad_begin;
  int64_t end = std::min(start + k, in + pad_end);
  return Span{std::max<int64_t>(start, 0), std::min(end, in), end - start};
}

void for_planes(const PoolGeom& g, double work_per_plane, const std::function<void(int64_t)>& fn) {
  parallel_for(g.N * g.C, fn, work_per_plane * static_cast<double>(g.N * g.C));
}

// Every plane has the same windows: compute them once per call, not once per output cell.
struct Windows {
  Scratch<Span> h, w;
  explicit Windows(const PoolGeom& g) : h(static_cast<size_t>(g.OH)), w(static_cast<size_t>(g.OW)) {
    for (int64_t o = 0; o < g.OH; ++o) h[static_cast<size_t>(o)] = window(o, g.KH, g.sh, g.pt, g.pb, g.H);
    for (int64_t o = 0; o < g.OW; ++o) w[static_cast<size_t>(o)] = window(o, g.KW, g.sw, g.pl, g.pr, g.W);
  }
};

}  // namespace

namespace {

// The same first-max / NaN-propagating rule as the generic loop, as selects rather than branches
// (random data mispredicts nearly every branch of the generic loop).
inline void take_if_greater(float v, int32_t i, float& best, int32_t& best_i) {
  // Bit masks rather than ?: so no branch can be emitted (measured on [32, 8, 28, 28] at one
  // thread: generic loop 700 us, this 600 us; still scalar -- a vector version is future work).
  const uint32_t take = 0u - static_cast<uint32_t>(!(v <= best) & (best == best));
  uint32_t vb, bb;
  std::memcpy(&vb, &v, 4);
  std::memcpy(&bb, &best, 4);
  bb = (vb & take) | (bb & ~take);
  std::memcpy(&best, &bb, 4);
  best_i = static_cast<int32_t>((static_cast<uint32_t>(i) & take) | (static_cast<uint32_t>(best_i) & ~take));
}

// 2x2 windows, stride 2, no padding: the zoo's pooling, and most CNNs'.
void maxpool2x2(const PoolGeom& g, const float* x, float* y, int32_t* argmax) {
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW, W = g.W;
  for_planes(g, static_cast<double>(OHW * 4), [&](int64_t p) {
    const float* xp = x + p * HW;
    float* yp = y + p * OHW;
    int32_t* ap = argmax ? argmax + p * OHW : nullptr;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const float* r0 = xp + 2 * oh * W;
      const float* r1 = r0 + W;
      const int32_t base = static_cast<int32_t>(2 * oh * W);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int32_t c = static_cast<int32_t>(2 * ow);
        float best = r0[c];
        int32_t best_i = base + c;
        take_if_greater(r0[c + 1], base + c + 1, best, best_i);
        take_if_greater(r1[c], base + static_cast<int32_t>(W) + c, best, best_i);
        take_if_greater(r1[c + 1], base + static_cast<int32_t>(W) + c + 1, best, best_i);
        yp[oh * g.OW + ow] = best;
        if (ap) ap[oh * g.OW + ow] = best_i;
      }
    }
  });
}

}  // namespace

void maxpool2d_forward(const PoolGeom& g, const float* x, float* y, int32_t* argmax) {
  if (g.KH == 2 && g.KW == 2 && g.sh == 2 && g.sw == 2 && g.pt == 0 && g.pl == 0 && 2 * g.OH <= g.H &&
      2 * g.OW <= g.W) {
    maxpool2x2(g, x, y, argmax);
    return;
  }
  const Windows win(g);
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  for_planes(g, static_cast<double>(OHW * g.KH * g.KW), [&](int64_t p) {
    const float* xp = x + p * HW;
    float* yp = y + p * OHW;
    int32_t* ap = argmax ? argmax + p * OHW : nullptr;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const Span h = win.h.data()[oh];
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const Span w = win.w.data()[ow];
        // Padding smaller than the kernel guarantees at least one real cell per window.
        int64_t best_i = h.lo * g.W + w.lo;
        float best = xp[best_i];
        for (int64_t ih = h.lo; ih < h.hi; ++ih)
          for (int64_t iw = w.lo; iw < w.hi; ++iw) {
            const float v = xp[ih * g.W + iw];
            // Strict > keeps the first max; a NaN wins once (and then stays) so it propagates.
            if (!(v <= best) && best == best) {
              best = v;
              best_i = ih * g.W + iw;
            }
          }
        yp[oh * g.OW + ow] = best;
        if (ap) ap[oh * g.OW + ow] = static_cast<int32_t>(best_i);
      }
    }
  });
}

void maxpool2d_backward(int64_t planes, int64_t HW, int64_t OHW, const float* dy, const int32_t* argmax,
                        float* dx) {
  parallel_for(
      planes,
      [&](int64_t p) {
        float* dxp = dx + p * HW;
        const float* dyp = dy + p * OHW;
        const int32_t* ap = argmax + p * OHW;
        std::fill(dxp, dxp + HW, 0.f);
        for (int64_t o = 0; o < OHW; ++o) dxp[ap[o]] += dyp[o];
      },
      static_cast<double>(planes) * (HW + OHW));
}

void avgpool2d_forward(const PoolGeom& g, const float* x, float* y, bool count_include_pad) {
  const Windows win(g);
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  for_planes(g, static_cast<double>(OHW * g.KH * g.KW), [&](int64_t p) {
    const float* xp = x + p * HW;
    float* yp = y + p * OHW;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const Span h = win.h.data()[oh];
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const Span w = win.w.data()[ow];
        float s = 0.f;
        for (int64_t ih = h.lo; ih < h.hi; ++ih)
          for (int64_t iw = w.lo; iw < w.hi; ++iw) s += xp[ih * g.W + iw];
        const int64_t count = count_include_pad ? h.padded * w.padded : (h.hi - h.lo) * (w.hi - w.lo);
        yp[oh * g.OW + ow] = s / static_cast<float>(count);
      }
    }
  });
}

void avgpool2d_backward(const PoolGeom& g, const float* dy, float* dx, bool count_include_pad) {
  const Windows win(g);
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  for_planes(g, static_cast<double>(OHW * g.KH * g.KW + HW), [&](int64_t p) {
    float* dxp = dx + p * HW;
    const float* dyp = dy + p * OHW;
    std::fill(dxp, dxp + HW, 0.f);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const Span h = win.h.data()[oh];
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const Span w = win.w.data()[ow];
        const int64_t count = count_include_pad ? h.padded * w.padded : (h.hi - h.lo) * (w.hi - w.lo);
        const float d = dyp[oh * g.OW + ow] / static_cast<float>(count);
        for (int64_t ih = h.lo; ih < h.hi; ++ih)
          for (int64_t iw = w.lo; iw < w.hi; ++iw) dxp[ih * g.W + iw] += d;
      }
    }
  });
}

void global_avgpool_forward(int64_t planes, int64_t HW, const float* x, float* y) {
  parallel_for(
      planes,
      [&](int64_t p) {
        const float* xp = x + p * HW;
        float s = 0.f;
        for (int64_t i = 0; i < HW; ++i) s += xp[i];
        y[p] = s / static_cast<float>(HW);
      },
      static_cast<double>(planes) * HW);
}

void global_avgpool_backward(int64_t planes, int64_t HW, const float* dy, float* dx) {
  parallel_for(
      planes,
      [&](int64_t p) {
        const float d = dy[p] / static_cast<float>(HW);
        std::fill(dx + p * HW, dx + (p + 1) * HW, d);
      },
      static_cast<double>(planes) * HW);
}

}  // namespace ftte

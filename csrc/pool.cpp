// Pooling. Every kernel runs one (image, channel) plane per task: planes are independent, so
// the result never depends on the thread count, and backward scatters stay within a plane.
#include "pool.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// best, best_i := v, i where take is all ones, else unchanged. Bit masks rather than ?: so no
// branch can be emitted (random data mispredicts nearly every branch of the generic loop; the
// 2x2 tail columns use these).
inline void select_if(uint32_t take, float v, int32_t i, float& best, int32_t& best_i) {
  uint32_t vb, bb;
  std::memcpy(&vb, &v, 4);
  std::memcpy(&bb, &best, 4);
  bb = (vb & take) | (bb & ~take);
  std::memcpy(&best, &bb, 4);
  best_i = static_cast<int32_t>((static_cast<uint32_t>(i) & take) | (static_cast<uint32_t>(best_i) & ~take));
}

// The same first-max / NaN-propagating rule as the generic loop.
inline void take_if_greater(float v, int32_t i, float& best, int32_t& best_i) {
  select_if(0u - static_cast<uint32_t>(!(v <= best) & (best == best)), v, i, best, best_i);
}

// The fused ReLU's rule (see maxpool2d_relu_forward_window): best starts at +0 and the sentinel,
// and a cell takes over only when strictly above it (a NaN never is: relu gives it +0).
inline void take_if_above(float v, int32_t i, float& best, int32_t& best_i) {
  select_if(0u - static_cast<uint32_t>(v > best), v, i, best, best_i);
}

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

// take_if_greater for four windows at once (GCC/Clang vector extensions: SSE2 or NEON).
inline void take4(v4f v, v4i i, v4f& best, v4i& best_i) {
  const v4i take = ~(v <= best) & (best == best);  // lanes: all ones where v replaces best
  v4i vb, bb;
  std::memcpy(&vb, &v, 16);
  std::memcpy(&bb, &best, 16);
  bb = (vb & take) | (bb & ~take);
  std::memcpy(&best, &bb, 16);
  best_i = (i & take) | (best_i & ~take);
}

// Lanes i0..i3 of the 8 lanes of a then b (GCC/Clang vector extensions: one shuffle on SSE2/NEON).
template <int i0, int i1, int i2, int i3, class V>
inline V shuffle4(V a, V b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, i0, i1, i2, i3);
#else
  return __builtin_shuffle(a, b, v4i{i0, i1, i2, i3});
#endif
}

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, 16);
  return v;
}

// The low bytes of four lanes (each 0..255) to 4 bytes of memory, lane order. Little-endian:
// shifts and ORs in registers, one 4-byte store (four lane extractions and byte stores took 17
// instructions a step on SSE2). Big-endian builds store byte by byte.
inline void store_index4(v4i v, uint8_t* out) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  typedef uint64_t v2u64 __attribute__((vector_size(16)));
  v2u64 q;
  std::memcpy(&q, &v, 16);
  q |= q >> 24;  // each 64-bit half: lane 2j in byte 0, lane 2j+1 in byte 1
  v4i h;
  std::memcpy(&h, &q, 16);
  const v4i packed = h | (shuffle4<2, 2, 2, 2>(h, h) << 16);  // halves 0 and 1 side by side
  const uint32_t word = static_cast<uint32_t>(packed[0]);
  std::memcpy(out, &word, 4);
#else
  for (int k = 0; k < 4; ++k) out[k] = static_cast<uint8_t>(v[k]);
#endif
}
inline void store_index4(v4i v, int32_t* out) { std::memcpy(out, &v, 16); }

// The strict > chain from `start` over a window's other three cells: their max (the first one
// wins a tie), and the compares that took (the last one that took names the cell).
struct StrictChain {
  v4f best;
  v4i t1, t2, t3;
};
inline StrictChain strict_chain(v4f start, v4f tr, v4f bl, v4f br) {
  const v4i t1 = tr > start;
  const v4f m1 = t1 ? tr : start;
  const v4i t2 = bl > m1;
  const v4f m2 = t2 ? bl : m1;
  const v4i t3 = br > m2;
  return {t3 ? br : m2, t1, t2, t3};
}

// 2x2 windows, stride 2, no padding: the zoo's pooling, and most CNNs'. Four outputs at a time
// (even/odd columns split by shuffles), the same first-max / NaN rule as the generic loop.
// Measured on [32, 8, 28, 28] at one thread: generic loop 700 us, this 198 us.
//
// Without NaN the rule is a plain chain of strict > (the first max wins, and a +0/-0 tie keeps
// the first zero's bits): one compare and one select per cell instead of take4's NaN-aware
// three-op test and two selects, and the index follows from the three compares. Each plane
// also ORs an unordered-compare of its cells; a plane holding a NaN is done again with take4
// (the exact rule), so a NaN costs one plane a second pass, never a different result.
//
// Relu (the fused ReLU, uint8 only): the chain starts from +0 and the sentinel, so no cell is
// relu'd at all, and there is no NaN to look for (relu(NaN) = +0 never wins a strict >).
template <class Index, bool Relu>
void maxpool2x2(const PoolGeom& g, const float* x, float* y, Index* argmax) {
  constexpr bool window_relative = std::is_same<Index, uint8_t>::value;
  static_assert(window_relative || !Relu, "the fused ReLU keeps window positions");
  for_planes(g, static_cast<double>(g.OH * g.OW * 4), [&](int64_t p) {
    // Locals of the task: read through the lambda's captures, the geometry was reloaded after
    // every argmax store (a uint8_t store may alias anything).
    const int64_t OH = g.OH, OW = g.OW, W = g.W, HW = g.H * g.W, OHW = OH * OW;
    // Index offsets of the four cells: 0, 1 (top row), 2, 3 (bottom row) inside the window, or
    // 0, 1, W, W+1 in the plane (from the window's first cell).
    const int32_t w = window_relative ? 2 : static_cast<int32_t>(W);
    const v4i k1 = {1, 1, 1, 1}, kw = {w, w, w, w}, kw1 = kw + 1;
    float* const y_plane = y + p * OHW;
    Index* const a_plane = argmax ? argmax + p * OHW : nullptr;
    const float* xp = x + p * HW;
    for (int exact = 0; exact < 2; ++exact) {
      v4i nan_seen = {0, 0, 0, 0};
      for (int64_t oh = 0; oh < OH; ++oh) {
        const float* r0 = xp + 2 * oh * W;
        const float* r1 = r0 + W;
        float* y_row = y_plane + oh * OW;
        Index* a_row = a_plane ? a_plane + oh * OW : nullptr;
        const int32_t base = window_relative ? 0 : static_cast<int32_t>(2 * oh * W);
        // Four outputs per step; a row of at least 4 whose width is not a multiple of 4 ends with
        // one step over its last 4 outputs, overlapping the previous one (recomputing an output
        // gives the same bits), instead of a scalar tail: rows are short here (7 and 14 wide in
        // the zoo CNN, where the tail took half the row's time).
        int64_t ow = 0;
        for (; ow < OW && OW >= 4; ow += 4) {
          if (ow + 4 > OW) ow = OW - 4;
          const int64_t c = 2 * ow;
          const v4f a0 = load4(r0 + c), a1 = load4(r0 + c + 4), b0 = load4(r1 + c), b1 = load4(r1 + c + 4);
          const v4f tl = shuffle4<0, 2, 4, 6>(a0, a1), tr = shuffle4<1, 3, 5, 7>(a0, a1);
          const v4f bl = shuffle4<0, 2, 4, 6>(b0, b1), br = shuffle4<1, 3, 5, 7>(b0, b1);
          const int32_t c0 = base + static_cast<int32_t>(c);
          const v4i col = window_relative ? v4i{0, 0, 0, 0} : v4i{c0, c0 + 2, c0 + 4, c0 + 6};
          v4f best;
          v4i best_i;
          if (Relu) {
            const v4f zero = {0.f, 0.f, 0.f, 0.f};
            const v4i gated = {kReluPoolGated, kReluPoolGated, kReluPoolGated, kReluPoolGated};
            const v4i t0 = tl > zero;
            const StrictChain ch = strict_chain(t0 ? tl : zero, tr, bl, br);
            best = ch.best;
            best_i = ch.t3 ? kw1 : (ch.t2 ? kw : (ch.t1 ? k1 : (~t0 & gated)));
          } else if (!exact) {
            nan_seen |= (a0 != a0) | (a1 != a1) | (b0 != b0) | (b1 != b1);
            const StrictChain ch = strict_chain(tl, tr, bl, br);
            best = ch.best;
            // The last compare that took names the cell: 3 if t3, else 2 if t2, else 1 if t1.
            best_i = col + (ch.t3 ? kw1 : (ch.t2 ? kw : (ch.t1 & k1)));
          } else {
            best = tl;
            best_i = col;
            take4(tr, col + 1, best, best_i);
            take4(bl, col + w, best, best_i);
            take4(br, col + w + 1, best, best_i);
          }
          std::memcpy(y_row + ow, &best, 16);
          if (a_row) {
            store_index4(best_i, a_row + ow);
          }
        }
        for (; ow < OW; ++ow) {  // rows narrower than 4: the exact rule, one window at a time
          const int32_t c = window_relative ? 0 : static_cast<int32_t>(2 * ow);
          const float* t = r0 + 2 * ow;
          const float* b = r1 + 2 * ow;
          float best;
          int32_t best_i;
          if (Relu) {
            best = 0.f;
            best_i = kReluPoolGated;
            take_if_above(t[0], 0, best, best_i);
            take_if_above(t[1], 1, best, best_i);
            take_if_above(b[0], 2, best, best_i);
            take_if_above(b[1], 3, best, best_i);
          } else {
            best = t[0];
            best_i = base + c;
            take_if_greater(t[1], base + c + 1, best, best_i);
            take_if_greater(b[0], base + w + c, best, best_i);
            take_if_greater(b[1], base + w + c + 1, best, best_i);
          }
          y_row[ow] = best;
          if (a_row) a_row[ow] = static_cast<Index>(best_i);
        }
      }
      if (!(nan_seen[0] | nan_seen[1] | nan_seen[2] | nan_seen[3])) break;
    }
  });
}

// 2x2 windows, stride 2, no padding, none running past the end: maxpool2x2's case.
inline bool tiles_2x2(const PoolGeom& g) {
  return g.KH == 2 && g.KW == 2 && g.sh == 2 && g.sw == 2 && g.pt == 0 && g.pl == 0 && 2 * g.OH <= g.H &&
         2 * g.OW <= g.W;
}

template <class Index, bool Relu>
void maxpool_generic(const PoolGeom& g, const float* x, float* y, Index* argmax) {
  constexpr bool window_relative = std::is_same<Index, uint8_t>::value;
  static_assert(window_relative || !Relu, "the fused ReLU keeps window positions");
  if (tiles_2x2(g)) {
    maxpool2x2<Index, Relu>(g, x, y, argmax);
    return;
  }
  const Windows win(g);
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  for_planes(g, static_cast<double>(OHW * g.KH * g.KW), [&](int64_t p) {
    const float* xp = x + p * HW;
    float* yp = y + p * OHW;
    Index* ap = argmax ? argmax + p * OHW : nullptr;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const Span h = win.h.data()[oh];
      const int64_t h_start = oh * g.sh - g.pt;  // the window's first row, padding included
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const Span w = win.w.data()[ow];
        const int64_t w_start = ow * g.sw - g.pl;
        // Padding smaller than the kernel guarantees at least one real cell per window.
        // best_i: the plane index (int32 argmax) or the window position (uint8), whichever is stored.
        // Relu: +0 and the sentinel until a cell is above 0 (see maxpool2x2).
        int64_t best_i = Relu              ? kReluPoolGated
                         : window_relative ? (h.lo - h_start) * g.KW + (w.lo - w_start)
                                           : h.lo * g.W + w.lo;
        float best = Relu ? 0.f : xp[h.lo * g.W + w.lo];
        for (int64_t ih = h.lo; ih < h.hi; ++ih) {
          // best_i is row_base + iw in either form: the same loop body, so the same if-conversion
          // (a longer expression in the branch made the uint8 form 25% slower).
          const int64_t row_base = window_relative ? (ih - h_start) * g.KW - w_start : ih * g.W;
          for (int64_t iw = w.lo; iw < w.hi; ++iw) {
            const float v = xp[ih * g.W + iw];
            // Strict > keeps the first max; a NaN wins once (and then stays) so it propagates.
            if (Relu ? v > best : !(v <= best) && best == best) {
              best = v;
              best_i = row_base + iw;
            }
          }
        }
        yp[oh * g.OW + ow] = best;
        if (ap) ap[oh * g.OW + ow] = static_cast<Index>(best_i);
      }
    }
  });
}

}  // namespace

namespace {

// The tiles_2x2 case. Windows tile the plane without overlap: every dx cell is written once, dy or
// 0, with no zero-fill pass and no scatter. 0 + d as the scatter computes it (a -0 dy gives +0).
// kReluPoolGated matches none of the positions 0..3 below: its window gets +0 throughout, so the
// fused ReLU's backward is this same code (one copy: two instances timed 10% apart).
void maxpool2x2_backward(const PoolGeom& g, const float* dy, const uint8_t* argmax, float* dx) {
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  for_planes(g, static_cast<double>(HW), [&](int64_t p) {
    // Geometry in locals: through the captured reference it was reloaded every step (the
    // vector stores go through memcpy, which may alias anything).
    const int64_t OH = g.OH, OW = g.OW, W = g.W;
    float* dxp = dx + p * HW;
    const float* dyp = dy + p * OHW;
    const uint8_t* ap = argmax + p * OHW;
    for (int64_t oh = 0; oh < OH; ++oh) {
      float* r0 = dxp + 2 * oh * W;
      float* r1 = r0 + W;
      const float* d_row = dyp + oh * OW;
      const uint8_t* a_row = ap + oh * OW;
      int64_t ow = 0;
      // Four outputs per step, the last step overlapping the one before when the row's width is
      // not a multiple of 4 (the same cells get the same bits again), as in the forward.
      for (; ow < OW && OW >= 4; ow += 4) {
        if (ow + 4 > OW) ow = OW - 4;
        const v4f zero = {0.f, 0.f, 0.f, 0.f};
        const v4f d = zero + load4(d_row + ow);
        v4i bits;
        std::memcpy(&bits, &d, 16);
        // Lane k compares byte k of the four positions (in memory order, whatever the CPU's
        // byte order) in place: no unpacking of bytes into lanes.
        uint8_t four[4] = {a_row[ow], a_row[ow + 1], a_row[ow + 2], a_row[ow + 3]};
        uint32_t packed;
        std::memcpy(&packed, four, 4);
        const uint8_t unit_bytes[16] = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
        const uint8_t lane_bytes[16] = {255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 255, 0, 0, 0, 0, 255};
        v4i unit, lane;
        std::memcpy(&unit, unit_bytes, 16);
        std::memcpy(&lane, lane_bytes, 16);
        const int32_t ps = static_cast<int32_t>(packed);
        const v4i r = v4i{ps, ps, ps, ps} & lane;  // lane k: byte k of `four` where lane's mask puts it
        const v4i c0 = bits & (r == unit * 0), c1 = bits & (r == unit), c2 = bits & (r == unit * 2),
                  c3 = bits & (r == unit * 3);
        // Windows' cells interleaved back into rows: top row (c0, c1), bottom row (c2, c3).
        const v4i t0 = shuffle4<0, 4, 1, 5>(c0, c1), t1 = shuffle4<2, 6, 3, 7>(c0, c1);
        const v4i b0 = shuffle4<0, 4, 1, 5>(c2, c3), b1 = shuffle4<2, 6, 3, 7>(c2, c3);
        std::memcpy(r0 + 2 * ow, &t0, 16);
        std::memcpy(r0 + 2 * ow + 4, &t1, 16);
        std::memcpy(r1 + 2 * ow, &b0, 16);
        std::memcpy(r1 + 2 * ow + 4, &b1, 16);
      }
      for (; ow < OW; ++ow) {
        const float d = 0.f + d_row[ow];
        uint32_t bits;
        std::memcpy(&bits, &d, 4);
        const uint32_t r = a_row[ow];
        // Bit masks, not ?: (random positions would mispredict a branch three times in four).
        const uint32_t cell[4] = {bits & (0u - (r == 0)), bits & (0u - (r == 1)), bits & (0u - (r == 2)),
                                  bits & (0u - (r == 3))};
        std::memcpy(r0 + 2 * ow, cell, 8);
        std::memcpy(r1 + 2 * ow, cell + 2, 8);
      }
      std::fill(r0 + 2 * OW, r0 + W, 0.f);  // an odd width's last column
      std::fill(r1 + 2 * OW, r1 + W, 0.f);
    }
    std::fill(dxp + 2 * OH * W, dxp + HW, 0.f);  // an odd height's last row
  });
}

// Gated: argmax may hold kReluPoolGated, whose window gets no gradient (the fused ReLU's).
template <bool Gated>
void maxpool_backward_window(const PoolGeom& g, const float* dy, const uint8_t* argmax, float* dx) {
  if (tiles_2x2(g)) {
    maxpool2x2_backward(g, dy, argmax, dx);
    return;
  }
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  // Offset of each window position from the window's first (padded) cell in the plane: a table
  // lookup instead of a division per output.
  int64_t offset[256];
  for (int64_t r = 0; r < g.KH * g.KW && r < 256; ++r) offset[r] = (r / g.KW) * g.W + r % g.KW;
  for_planes(g, static_cast<double>(HW + OHW), [&](int64_t p) {
    float* dxp = dx + p * HW;
    const float* dyp = dy + p * OHW;
    const uint8_t* ap = argmax + p * OHW;
    std::fill(dxp, dxp + HW, 0.f);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      // May be negative (top/left padding): the binding checked every position is a real cell.
      const int64_t row_start = (oh * g.sh - g.pt) * g.W - g.pl;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t o = oh * g.OW + ow;
        if (Gated && ap[o] == kReluPoolGated) continue;
        dxp[row_start + ow * g.sw + offset[ap[o]]] += dyp[o];  // output order, as maxpool2d_backward
      }
    }
  });
}

}  // namespace

void maxpool2d_forward(const PoolGeom& g, const float* x, float* y, int32_t* argmax) {
  maxpool_generic<int32_t, false>(g, x, y, argmax);
}

void maxpool2d_forward_window(const PoolGeom& g, const float* x, float* y, uint8_t* argmax) {
  maxpool_generic<uint8_t, false>(g, x, y, argmax);
}

void maxpool2d_relu_forward_window(const PoolGeom& g, const float* x, float* y, uint8_t* argmax) {
  maxpool_generic<uint8_t, true>(g, x, y, argmax);
}

void maxpool2d_backward_window(const PoolGeom& g, const float* dy, const uint8_t* argmax, float* dx) {
  maxpool_backward_window<false>(g, dy, argmax, dx);
}

void maxpool2d_relu_backward_window(const PoolGeom& g, const float* dy, const uint8_t* argmax, float* dx) {
  maxpool_backward_window<true>(g, dy, argmax, dx);
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

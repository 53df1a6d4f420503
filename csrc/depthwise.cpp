// Depthwise convolution, direct: one output plane (or one input plane for dx, or one selected
// output channel for dW) per task, each summed in a fixed order, so results never depend on the
// thread count. No im2col: a depthwise layer has KH*KW multiply-adds per output cell, and
// columns would cost KH*KW times the input for that little work.
// Grouped convolution reuses conv2d (im2col + sgemm) one image and one group at a time.
#include "depthwise.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "workspace.h"

namespace ftte {

namespace {

// One depthwise channel's KH*KW taps as floats: the weight itself when float32, else dequantised
// here (on the stack up to 7x7, on the heap beyond: no layer in the zoo has larger taps).
class Taps {
 public:
  Taps(const WeightView& w, int64_t oc, int64_t KK) {
    if (!w.quantized()) {
      p_ = w.f + oc * KK;
      return;
    }
    float* dst = KK <= kSmall ? small_ : (big_.resize(static_cast<size_t>(KK)), big_.data());
    const int8_t* q = w.q + oc * KK;
    const float s = w.scale[oc];
    for (int64_t k = 0; k < KK; ++k) dst[k] = static_cast<float>(q[k]) * s;
    p_ = dst;
  }
  Taps(const Taps&) = delete;  // p_ may point into small_
  const float* get() const { return p_; }

 private:
  static constexpr int64_t kSmall = 49;
  float small_[kSmall];
  std::vector<float> big_;
  const float* p_;
};


// Output columns [lo, hi) whose input column ow*sw - pl + j lies inside [0, W) (as in conv2d.cpp).
inline void cols_in_range(const ConvGeom& g, int64_t j, int64_t& lo, int64_t& hi) {
  int64_t off = g.pl - j;  // iw = ow*sw - off
  lo = off > 0 ? (off + g.sw - 1) / g.sw : 0;
  hi = (g.W - 1 + off) >= 0 ? std::min(g.OW, (g.W - 1 + off) / g.sw + 1) : 0;
  lo = std::min(lo, g.OW);
  hi = std::max(hi, lo);
}

// yp[OH,OW] (+)= the depthwise correlation of one input plane xp[H,W] with kernel k[KH,KW].
void plane_forward(const ConvGeom& g, const float* xp, const float* k, float* yp) {
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    float* yrow = yp + oh * g.OW;
    for (int64_t i = 0; i < g.KH; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i;
      if (ih < 0 || ih >= g.H) continue;
      const float* xrow = xp + ih * g.W;
      for (int64_t j = 0; j < g.KW; ++j) {
        int64_t lo, hi;
        cols_in_range(g, j, lo, hi);
        const float wv = k[i * g.KW + j];
        const float* src = xrow + (lo * g.sw - g.pl + j);
        if (g.sw == 1)
          for (int64_t ow = lo; ow < hi; ++ow) yrow[ow] += wv * src[ow - lo];
        else
          for (int64_t ow = lo; ow < hi; ++ow) yrow[ow] += wv * src[(ow - lo) * g.sw];
      }
    }
  }
}

// dxp[H,W] += the adjoint of plane_forward for dy plane dyp and kernel k.
void plane_backward_dx(const ConvGeom& g, const float* dyp, const float* k, float* dxp) {
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const float* dyrow = dyp + oh * g.OW;
    for (int64_t i = 0; i < g.KH; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i;
      if (ih < 0 || ih >= g.H) continue;
      float* dxrow = dxp + ih * g.W;
      for (int64_t j = 0; j < g.KW; ++j) {
        int64_t lo, hi;
        cols_in_range(g, j, lo, hi);
        const float wv = k[i * g.KW + j];
        float* dst = dxrow + (lo * g.sw - g.pl + j);
        if (g.sw == 1)
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow - lo] += wv * dyrow[ow];
        else
          for (int64_t ow = lo; ow < hi; ++ow) dst[(ow - lo) * g.sw] += wv * dyrow[ow];
      }
    }
  }
}

// acc[KH*KW] = per kernel tap, the sum over the plane of dy * x at that tap (overwritten).
// Each tap's products are first summed down the rows into lane[OW] (a loop the compiler can
// vectorise, unlike one running scalar sum), then lane is summed: a fixed order either way.
void plane_backward_dw(const ConvGeom& g, const float* xp, const float* dyp, float* acc, float* lane) {
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      int64_t lo, hi;
      cols_in_range(g, j, lo, hi);
      std::fill(lane, lane + g.OW, 0.f);
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t ih = oh * g.sh - g.pt + i;
        if (ih < 0 || ih >= g.H) continue;
        const float* src = xp + ih * g.W + (lo * g.sw - g.pl + j);
        const float* dyrow = dyp + oh * g.OW;
        if (g.sw == 1)
          for (int64_t ow = lo; ow < hi; ++ow) lane[ow] += dyrow[ow] * src[ow - lo];
        else
          for (int64_t ow = lo; ow < hi; ++ow) lane[ow] += dyrow[ow] * src[(ow - lo) * g.sw];
      }
      float s = 0.f;
      for (int64_t ow = lo; ow < hi; ++ow) s += lane[ow];
      acc[i * g.KW + j] = s;
    }
}


// Stride 1: one plane as long flat loops. The input plane is zero-padded once (xpad[Hp*Wp]) and
// outputs are computed at the padded row pitch Wp (ext[Q], Q = (OH-1)*Wp + OW; the Wp-OW extra
// entries of each row are junk for the forward and zeros for the gradients), so every kernel tap
// is one contiguous multiply-add over Q elements instead of OH rows of OW (DS-CNN's planes are 5
// wide; the short rows cost more than the arithmetic).
struct Flat {
  int64_t Hp, Wp, Q;
};

inline bool flat_path(const ConvGeom& g) { return g.sh == 1 && g.sw == 1 && g.OH > 0 && g.OW > 0; }

inline Flat flat_geom(const ConvGeom& g) {
  const int64_t Hp = g.H + g.pt + g.pb, Wp = g.W + g.pl + g.pr;
  return {Hp, Wp, (g.OH - 1) * Wp + g.OW};
}

void pad_plane(const ConvGeom& g, const Flat& f, const float* xp, float* xpad) {
  std::fill(xpad, xpad + f.Hp * f.Wp, 0.f);
  for (int64_t h = 0; h < g.H; ++h)
    std::memcpy(xpad + (h + g.pt) * f.Wp + g.pl, xp + h * g.W, static_cast<size_t>(g.W) * sizeof(float));
}

// ext[Q] = the dy plane at pitch Wp, zeros between rows.
void spread_plane(const ConvGeom& g, const Flat& f, const float* dyp, float* ext) {
  std::fill(ext, ext + f.Q, 0.f);
  for (int64_t oh = 0; oh < g.OH; ++oh)
    std::memcpy(ext + oh * f.Wp, dyp + oh * g.OW, static_cast<size_t>(g.OW) * sizeof(float));
}

// sum a[q]*b[q] in 8 fixed lanes (vectorisable, and the same grouping on every machine).
float dot_lanes(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t q = 0;
  for (; q + 8 <= n; q += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[q + k] * b[q + k];
  float tail = 0.f;
  for (; q < n; ++q) tail += a[q] * b[q];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

size_t flat_task_floats(const ConvGeom& g) {
  const Flat f = flat_geom(g);
  return static_cast<size_t>(f.Hp * f.Wp + f.Q);
}

}  // namespace

size_t depthwise_conv2d_scratch_bytes(const ConvGeom& g, bool backward, bool want_dw, bool want_dx, int threads) {
  if (!flat_path(g) || g.N == 0 || g.OC == 0) return 0;
  int64_t tasks = g.N * g.OC;
  if (backward) {
    if (!want_dw && !want_dx) return 0;
    tasks = std::max<int64_t>(want_dw ? g.OC : 0, want_dx ? g.N * g.C : 0);
  }
  return flat_task_floats(g) * sizeof(float) * static_cast<size_t>(std::min<int64_t>(std::max(threads, 1), tasks));
}

namespace {

void forward_flat(const ConvGeom& g, const float* xp, const float* k, float bias, float* yp) {
  const Flat f = flat_geom(g);
  Scratch<float> buf(flat_task_floats(g));
  float* xpad = buf.data();
  float* ext = xpad + f.Hp * f.Wp;
  pad_plane(g, f, xp, xpad);
  std::fill(ext, ext + f.Q, bias);
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      const float wv = k[i * g.KW + j];
      const float* src = xpad + i * f.Wp + j;
#pragma GCC ivdep
      for (int64_t q = 0; q < f.Q; ++q) ext[q] += wv * src[q];
    }
  for (int64_t oh = 0; oh < g.OH; ++oh)
    std::memcpy(yp + oh * g.OW, ext + oh * f.Wp, static_cast<size_t>(g.OW) * sizeof(float));
}

}  // namespace

void depthwise_conv2d_forward(const ConvGeom& g, const float* x, const WeightView& w, const float* b, float* y) {
  const int64_t M = g.C > 0 ? g.OC / g.C : 0, P = g.OH * g.OW, KK = g.KH * g.KW;
  parallel_for(
      g.N * g.OC,
      [&](int64_t t) {
        const int64_t n = t / g.OC, oc = t % g.OC, c = oc / M;
        float* yp = y + t * P;
        if (flat_path(g)) {
          forward_flat(g, x + (n * g.C + c) * g.H * g.W, Taps(w, oc, KK).get(), b ? b[oc] : 0.f, yp);
          return;
        }
        std::fill(yp, yp + P, b ? b[oc] : 0.f);
        plane_forward(g, x + (n * g.C + c) * g.H * g.W, Taps(w, oc, KK).get(), yp);
      },
      2.0 * g.N * g.OC * P * KK);
}

void depthwise_conv2d_backward(const ConvGeom& g, const float* x, const WeightView& w, const float* dy,
                               const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate) {
  const int64_t M = g.C > 0 ? g.OC / g.C : 0, P = g.OH * g.OW, KK = g.KH * g.KW, HW = g.H * g.W;
  if (R == 0) dw = db = nullptr;

  // dW and db: one task per selected row, images summed in order.
  if (dw || db)
    parallel_for(
        R,
        [&](int64_t r) {
          const int64_t oc = rows ? rows[r] : r, c = oc / M;
          std::vector<float> total(dw ? static_cast<size_t>(KK) : 0, 0.f), part(total.size()),
              lane(dw ? static_cast<size_t>(g.OW) : 0);
          const bool flat = dw && flat_path(g);
          const Flat f = flat_geom(g);
          Scratch<float> buf(flat ? flat_task_floats(g) : 0);
          float btotal = 0.f;
          for (int64_t n = 0; n < g.N; ++n) {
            const float* dyp = dy + (n * g.OC + oc) * P;
            if (db) {
              float s = 0.f;
              for (int64_t p = 0; p < P; ++p) s += dyp[p];
              btotal += s;
            }
            if (flat) {
              float* xpad = buf.data();
              float* ext = xpad + f.Hp * f.Wp;
              pad_plane(g, f, x + (n * g.C + c) * HW, xpad);
              spread_plane(g, f, dyp, ext);
              for (int64_t i = 0; i < g.KH; ++i)
                for (int64_t j = 0; j < g.KW; ++j) total[i * g.KW + j] += dot_lanes(ext, xpad + i * f.Wp + j, f.Q);
            } else if (dw) {
              plane_backward_dw(g, x + (n * g.C + c) * HW, dyp, part.data(), lane.data());
              for (int64_t k = 0; k < KK; ++k) total[k] += part[k];
            }
          }
          if (db) db[r] = accumulate ? db[r] + btotal : btotal;
          if (dw)
            for (int64_t k = 0; k < KK; ++k) dw[r * KK + k] = accumulate ? dw[r * KK + k] + total[k] : total[k];
        },
        2.0 * R * g.N * P * (dw ? KK : 1));

  // dx: one task per input plane; its M output channels are added in order.
  if (dx)
    parallel_for(
        g.N * g.C,
        [&](int64_t t) {
          const int64_t n = t / g.C, c = t % g.C;
          float* dxp = dx + t * HW;
          if (flat_path(g)) {
            const Flat f = flat_geom(g);
            Scratch<float> buf(flat_task_floats(g));
            float* dxpad = buf.data();
            float* ext = dxpad + f.Hp * f.Wp;
            std::fill(dxpad, dxpad + f.Hp * f.Wp, 0.f);
            for (int64_t m = 0; m < M; ++m) {
              const int64_t oc = c * M + m;
              spread_plane(g, f, dy + (n * g.OC + oc) * P, ext);
              const Taps taps(w, oc, KK);
              for (int64_t i = 0; i < g.KH; ++i)
                for (int64_t j = 0; j < g.KW; ++j) {
                  const float wv = taps.get()[i * g.KW + j];
                  float* dst = dxpad + i * f.Wp + j;
#pragma GCC ivdep
                  for (int64_t q = 0; q < f.Q; ++q) dst[q] += wv * ext[q];
                }
            }
            for (int64_t h = 0; h < g.H; ++h)
              std::memcpy(dxp + h * g.W, dxpad + (h + g.pt) * f.Wp + g.pl, static_cast<size_t>(g.W) * sizeof(float));
            return;
          }
          std::fill(dxp, dxp + HW, 0.f);
          for (int64_t m = 0; m < M; ++m) {
            const int64_t oc = c * M + m;
            plane_backward_dx(g, dy + (n * g.OC + oc) * P, Taps(w, oc, KK).get(), dxp);
          }
        },
        2.0 * g.N * g.OC * P * KK);
}

namespace {

// The geometry of one group of one image, for conv2d.
ConvGeom group_geom(const ConvGeom& g, int64_t group) {
  ConvGeom s = g;
  s.N = 1;
  s.C = g.C / group;
  s.OC = g.OC / group;
  return s;
}

}  // namespace

void grouped_conv2d_forward(const ConvGeom& g, int64_t group, const float* x, const WeightView& w, const float* b,
                            float* y) {
  const ConvGeom s = group_geom(g, group);
  const int64_t P = g.OH * g.OW, HW = g.H * g.W, Kw = s.C * g.KH * g.KW;
  // Images x groups are independent; conv2d runs inline inside a task (nested parallel_for).
  parallel_for(
      g.N * group,
      [&](int64_t t) {
        const int64_t n = t / group, k = t % group;
        conv2d_forward(s, x + (n * g.C + k * s.C) * HW, w.from_row(k * s.OC, Kw), b ? b + k * s.OC : nullptr,
                       y + (n * g.OC + k * s.OC) * P);
      },
      2.0 * g.N * g.OC * P * Kw);
}

void grouped_conv2d_backward(const ConvGeom& g, int64_t group, const float* x, const WeightView& w, const float* dy,
                             const int32_t* rows, int64_t R, float* dw, float* db, float* dx, bool accumulate) {
  const ConvGeom s = group_geom(g, group);
  const int64_t P = g.OH * g.OW, HW = g.H * g.W, Kw = s.C * g.KH * g.KW;
  if (R == 0) dw = db = nullptr;

  // The selected rows of each group, as local output channels, and the slots they fill.
  std::vector<std::vector<int32_t>> local(static_cast<size_t>(group)), slot(static_cast<size_t>(group));
  std::vector<int64_t> start(static_cast<size_t>(group) + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t oc = rows ? rows[r] : r, k = oc / s.OC;
    local[k].push_back(static_cast<int32_t>(oc - k * s.OC));
    slot[k].push_back(static_cast<int32_t>(r));
  }
  // A group whose rows fill consecutive slots (rows None, or sorted as a Subset keeps them)
  // writes straight into dw/db; the others sum into scratch, scattered to their slots at the end.
  std::vector<char> direct(static_cast<size_t>(group), 1);
  for (int64_t k = 0; k < group; ++k) {
    for (size_t i = 1; i < slot[k].size(); ++i)
      if (slot[k][i] != slot[k][0] + static_cast<int32_t>(i)) direct[k] = 0;
    start[k + 1] = start[k] + (direct[k] ? 0 : static_cast<int64_t>(local[k].size()));
  }
  const int64_t Rs = start[group];  // rows summed in scratch
  Scratch<float> gdw(dw ? static_cast<size_t>(Rs * Kw) : 0), gdb(db ? static_cast<size_t>(Rs) : 0);
  // Where group k's first row goes, and whether its first image adds to what is there.
  auto dw_of = [&](int64_t k) { return direct[k] ? dw + slot[k][0] * Kw : gdw.data() + start[k] * Kw; };
  auto db_of = [&](int64_t k) { return direct[k] ? db + slot[k][0] : gdb.data() + start[k]; };
  // One task per group: the images are summed in order inside it, so dW never depends on threads.
  parallel_for(
      group,
      [&](int64_t k) {
        const int64_t Rk = static_cast<int64_t>(local[k].size());
        float* dwk = dw && Rk ? dw_of(k) : nullptr;
        float* dbk = db && Rk ? db_of(k) : nullptr;
        const bool add_first = accumulate && direct[k];
        if (g.N == 0) {  // an empty batch has zero gradient
          if (dwk && !add_first) std::fill(dwk, dwk + Rk * Kw, 0.f);
          if (dbk && !add_first) std::fill(dbk, dbk + Rk, 0.f);
          return;
        }
        if (!dwk && !dbk && !dx) return;
        for (int64_t n = 0; n < g.N; ++n)
          conv2d_backward(s, x ? x + (n * g.C + k * s.C) * HW : nullptr, w.from_row(k * s.OC, Kw),
                          dy + (n * g.OC + k * s.OC) * P, local[k].data(), Rk, dwk, dbk,
                          dx ? dx + (n * g.C + k * s.C) * HW : nullptr, n > 0 || add_first);
      },
      2.0 * g.N * g.OC * P * Kw * ((dw ? 1 : 0) + (dx ? 1 : 0)) + 1.0);
  for (int64_t k = 0; k < group; ++k) {
    if (direct[k]) continue;
    for (size_t i = 0; i < slot[k].size(); ++i) {
      const int64_t r = slot[k][i], src = start[k] + static_cast<int64_t>(i);
      if (dw) {
        float* d = dw + r * Kw;
        const float* sp = gdw.data() + src * Kw;
        for (int64_t q = 0; q < Kw; ++q) d[q] = accumulate ? d[q] + sp[q] : sp[q];
      }
      if (db) db[r] = accumulate ? db[r] + gdb[static_cast<size_t>(src)] : gdb[static_cast<size_t>(src)];
    }
  }
}

size_t grouped_conv2d_scratch_bytes(const ConvGeom& g, int64_t group, bool backward, const int32_t* rows, int64_t R,
                                    bool want_dw, bool want_db, bool want_dx, int threads, bool int8_weight) {
  const ConvGeom s = group_geom(g, group);
  const int64_t Kw = s.C * g.KH * g.KW;
  threads = std::max(threads, 1);
  if (!backward)
    return conv2d_scratch_bytes(s, false, s.OC, false, false, 1, int8_weight) *
           static_cast<size_t>(std::min<int64_t>(threads, g.N * group));
  if (R == 0) want_dw = want_db = false;
  // Rows per group, and whether they fill consecutive slots (as in grouped_conv2d_backward).
  std::vector<int64_t> count(static_cast<size_t>(group), 0), first(static_cast<size_t>(group), -1);
  std::vector<char> direct(static_cast<size_t>(group), 1);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t k = (rows ? rows[r] : r) / s.OC;
    if (first[k] < 0) first[k] = r;
    if (r != first[k] + count[k]) direct[k] = 0;
    ++count[k];
  }
  int64_t Rs = 0;
  size_t task = 0;
  for (int64_t k = 0; k < group; ++k) {
    if (!direct[k]) Rs += count[k];
    if (g.N > 0)
      task = std::max(task, conv2d_scratch_bytes(s, true, count[k], want_dw && count[k] > 0, want_dx, 1, int8_weight));
  }
  const size_t sums = static_cast<size_t>((want_dw ? Rs * Kw : 0) + (want_db ? Rs : 0)) * sizeof(float);
  return sums + task * static_cast<size_t>(std::min<int64_t>(threads, group));
}

}  // namespace ftte

// Convolution as im2col + sgemm. Scratch is one tile of one image's column matrix
// [C*KH*KW, OH*OW] per image in flight (never the whole batch, nor a whole large map: see
// kTileBytes): on a Pi the columns of a large map would not fit next to the model.
// Results never depend on the thread count: images are independent, and the one sum over
// images (dW) is grouped into chunks fixed by the batch size, added in chunk order.
#include "conv2d.h"

#include <algorithm>
#include <cstring>

#include "gemm.h"
#include "parallel.h"
#include "vectorize.h"
#include "workspace.h"

namespace ftte {

int64_t window_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad_begin, int64_t pad_end, bool ceil_mode) {
  int64_t span = in + pad_begin + pad_end - k;
  if (span < 0 || stride < 1) return 0;
  int64_t out = (ceil_mode ? (span + stride - 1) / stride : span / stride) + 1;
  // ceil can add a window that starts in the end padding: it would see no real cell.
  if (ceil_mode && (out - 1) * stride >= in + pad_begin) --out;
  return out;
}

namespace {

// 1x1, stride 1, no padding: the image itself is the column matrix, no copy needed.
bool pointwise(const ConvGeom& g) {
  return g.KH == 1 && g.KW == 1 && g.sh == 1 && g.sw == 1 && g.pt == 0 && g.pl == 0 && g.pb == 0 && g.pr == 0;
}

// Output columns [lo, hi) whose input column ow*sw - pl + j lies inside [0, W).
inline void valid_cols(const ConvGeom& g, int64_t j, int64_t& lo, int64_t& hi) {
  int64_t off = g.pl - j;  // iw = ow*sw - off
  lo = off > 0 ? (off + g.sw - 1) / g.sw : 0;
  hi = (g.W - 1 + off) >= 0 ? std::min(g.OW, (g.W - 1 + off) / g.sw + 1) : 0;
  lo = std::min(lo, g.OW);
  hi = std::max(hi, lo);
}

// Calls row(oh, a, b) for every output row oh the tile [p0, p1) touches, with its columns
// [a, b): a possibly partial first row, whole rows (a = 0, b = OW), a possibly partial last row.
// Whole rows are most of the work, and with small maps each is short, so the caller's code for
// them can skip the clipping a partial row needs (full_row(oh) is called for those instead).
template <class Row, class FullRow>
inline void for_tile_rows(const ConvGeom& g, int64_t p0, int64_t p1, Row row, FullRow full_row) {
  int64_t oh = p0 / g.OW;
  if (p0 > oh * g.OW || p1 < (oh + 1) * g.OW) {  // first row partial
    row(oh, p0 - oh * g.OW, std::min(p1 - oh * g.OW, g.OW));
    ++oh;
  }
  for (; (oh + 1) * g.OW <= p1; ++oh) full_row(oh);
  if (oh * g.OW < p1) row(oh, int64_t(0), p1 - oh * g.OW);  // last row partial
}

// Sum of a plane's n floats in a grouping fixed by n alone: 16 running sums (element i goes to
// sum i % 16), combined in a fixed order, then the tail of n % 16 in order. One running sum was
// a chain of dependent adds, ~4 cycles per element: the bias gradient of the zoo CNN's conv1
// (32 images x 8 planes of 784) took longer than its whole weight gradient.
float plane_sum(const float* x, int64_t n) {
  typedef float v4f __attribute__((vector_size(16)));
  v4f a0 = {0.f, 0.f, 0.f, 0.f}, a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v4f b0, b1, b2, b3;
    std::memcpy(&b0, x + i, 16);
    std::memcpy(&b1, x + i + 4, 16);
    std::memcpy(&b2, x + i + 8, 16);
    std::memcpy(&b3, x + i + 12, 16);
    a0 += b0;
    a1 += b1;
    a2 += b2;
    a3 += b3;
  }
  const v4f a = (a0 + a1) + (a2 + a3);
  float s = (a[0] + a[1]) + (a[2] + a[3]);
  for (; i < n; ++i) s += x[i];
  return s;
}

// Stride 1 with an output as wide as the input (pl + pr == KW - 1, "same" width: the zoo's
// 3x3 pad-1 layers): tap (i, j) of output position p = oh*OW + ow reads input cell p + shift,
// shift = (i - pt)*W + (j - pl), wherever that cell is inside the image. So a tile's row of
// columns is one contiguous run of x, and only the positions whose cell is outside the image
// (rows above or below it; the first or last columns of a row, whose p + shift wraps onto the
// neighbouring row) need zeros. On small maps this replaces a short copy or add per output row
// and tap (the zoo CNN's 14-wide rows spent ~40% of conv2's forward in im2col's row copies).
bool flat_taps(const ConvGeom& g) { return g.sh == 1 && g.sw == 1 && g.OW == g.W && g.OH > 0 && g.OW > 0; }

// Of the tile [p0, p1), tap (i, j): [c0, c1) is the run whose p + shift lies in x's plane and
// whose rows are inside the image; everything before and after it reads padding. Inside the
// run, the columns [0, lo) and [hi, OW) of each row wrap (valid_cols' lo/hi for tap j).
struct FlatRun {
  int64_t shift, c0, c1, lo, hi;
};
inline FlatRun flat_run(const ConvGeom& g, int64_t i, int64_t j, int64_t p0, int64_t p1) {
  FlatRun r;
  r.shift = (i - g.pt) * g.W + (j - g.pl);
  const int64_t oh_lo = std::max<int64_t>(0, g.pt - i), oh_hi = std::min(g.OH, g.H + g.pt - i);
  const int64_t a = std::min(std::max(oh_lo * g.OW, p0), p1);
  const int64_t b = std::min(std::max(oh_hi * g.OW, a), p1);
  r.c0 = std::min(std::max(-r.shift, a), b);
  r.c1 = std::min(std::max(g.H * g.W - r.shift, r.c0), b);
  valid_cols(g, j, r.lo, r.hi);
  return r;
}

// Calls zero(q0, q1) for the wrapping positions [q0, q1) of every row inside the run.
template <class Zero>
inline void for_wrapped(const ConvGeom& g, const FlatRun& r, Zero zero) {
  if (r.lo == 0 && r.hi == g.OW) return;  // this tap's columns all read the image
  for (int64_t oh = r.c0 / g.OW; oh * g.OW < r.c1; ++oh) {
    const int64_t row = oh * g.OW;
    zero(std::max(row, r.c0), std::min(row + r.lo, r.c1));
    zero(std::max(row + r.hi, r.c0), std::min(row + g.OW, r.c1));
  }
}

// Zeroes a few floats (a row's padding columns: one or two per tap here). A plain loop or
// std::fill becomes a call to memset, whose fixed cost is most of the work for so few.
inline void zero_few(float* p, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    p[q] = 0.f;
    __asm__ volatile("");  // keeps the compiler from turning the loop into a memset call
  }
}

FTTE_VECTOR_CLONES
void add_run(float* __restrict out, const float* __restrict in, int64_t n) {
  for (int64_t q = 0; q < n; ++q) out[q] += in[q];
}

// im2col of the tile [p0, p1) for a flat_taps layer, channel c (see flat_taps).
void im2col_flat(const ConvGeom& g, const float* x, int64_t p0, int64_t p1, int64_t c, float* cols) {
  const int64_t T = p1 - p0;
  const float* plane = x + c * g.H * g.W;
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      float* dst = cols + ((c * g.KH + i) * g.KW + j) * T - p0;  // dst[p]: position p's entry
      const FlatRun r = flat_run(g, i, j, p0, p1);
      zero_few(dst + p0, r.c0 - p0);
      std::memcpy(dst + r.c0, plane + r.c0 + r.shift, static_cast<size_t>(r.c1 - r.c0) * sizeof(float));
      zero_few(dst + r.c1, p1 - r.c1);
      for_wrapped(g, r, [&](int64_t q0, int64_t q1) {
        zero_few(dst + q0, q1 - q0);
      });
    }
}

// col2im's adjoint for a flat_taps layer, channel c: the wrapping entries of the tile's columns
// are zeroed (cols is the caller's scratch, consumed here), then each tap adds one run onto the
// plane. Every cell receives the same entries in the same order as the per-row scatter, plus
// zeros where a wrapped entry lands on a real cell (x + 0 == x).
void col2im_flat(const ConvGeom& g, float* cols, int64_t p0, int64_t p1, int64_t c, float* plane) {
  const int64_t T = p1 - p0;
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      float* src = cols + ((c * g.KH + i) * g.KW + j) * T - p0;  // src[p]: position p's entry
      const FlatRun r = flat_run(g, i, j, p0, p1);
      for_wrapped(g, r, [&](int64_t q0, int64_t q1) {
        zero_few(src + q0, q1 - q0);
      });
      add_run(plane + r.c0 + r.shift, src + r.c0, r.c1 - r.c0);
    }
}

// cols[(c*KH + i)*KW + j][p - p0] = x[c][oh*sh - pt + i][ow*sw - pl + j] for the output
// positions p = oh*OW + ow in [p0, p1), zero in padding. Split over input channels (inline
// when already inside a per-image parallel loop).
void im2col(const ConvGeom& g, const float* x, int64_t p0, int64_t p1, float* cols) {
  const int64_t T = p1 - p0;
  if (flat_taps(g)) {
    parallel_for(
        g.C, [&](int64_t c) { im2col_flat(g, x, p0, p1, c, cols); }, static_cast<double>(g.C) * g.KH * g.KW * T);
    return;
  }
  parallel_for(
      g.C,
      [&](int64_t c) {
        for (int64_t i = 0; i < g.KH; ++i)
          for (int64_t j = 0; j < g.KW; ++j) {
            float* dst = cols + ((c * g.KH + i) * g.KW + j) * T;  // the tile's next entry
            int64_t lo, hi;
            valid_cols(g, j, lo, hi);
            // Output columns [a, b) of row oh, of which [l, h) read the input.
            auto copy = [&](int64_t oh, int64_t a, int64_t b, int64_t l, int64_t h) {
              const int64_t ih = oh * g.sh - g.pt + i;
              if (ih < 0 || ih >= g.H || l == h) {
                std::fill(dst, dst + (b - a), 0.f);
              } else {
                // Input cell of output column ow: src[(ow - l) * sw]; only valid columns are read.
                const float* src = x + (c * g.H + ih) * g.W + (l * g.sw - g.pl + j);
                float* out = dst + (l - a);
                std::fill(dst, out, 0.f);
                if (g.sw == 1)
                  std::memcpy(out, src, static_cast<size_t>(h - l) * sizeof(float));
                else if (g.sw == 2)  // a constant stride: the compiler vectorises it with shuffles
                  for (int64_t q = 0; q < h - l; ++q) out[q] = src[2 * q];
                else
                  for (int64_t q = 0; q < h - l; ++q) out[q] = src[q * g.sw];
                std::fill(dst + (h - a), dst + (b - a), 0.f);
              }
              dst += b - a;
            };
            for_tile_rows(
                g, p0, p1,
                [&](int64_t oh, int64_t a, int64_t b) {
                  const int64_t l = std::min(std::max(lo, a), b);
                  copy(oh, a, b, l, std::max(std::min(hi, b), l));
                },
                [&](int64_t oh) { copy(oh, 0, g.OW, lo, hi); });
          }
      },
      static_cast<double>(g.C) * g.KH * g.KW * T);
}

// The adjoint of im2col for the tile [p0, p1): dx += every column entry at the cell it was read
// from (dx's planes are zeroed first when `zero`). cols is scratch: the flat path zeroes its
// wrapping entries. Each channel's plane only receives from that
// channel's rows, so the split over channels never has two threads adding into one cell, and
// every cell sums its entries in a fixed order (tiles in order, then taps, then positions).
void col2im(const ConvGeom& g, float* cols, int64_t p0, int64_t p1, float* dx, bool zero) {
  const int64_t T = p1 - p0;
  parallel_for(
      g.C,
      [&](int64_t c) {
        float* plane = dx + c * g.H * g.W;
        if (zero) std::fill(plane, plane + g.H * g.W, 0.f);
        if (flat_taps(g)) {
          col2im_flat(g, cols, p0, p1, c, plane);
          return;
        }
        for (int64_t i = 0; i < g.KH; ++i)
          for (int64_t j = 0; j < g.KW; ++j) {
            const float* src = cols + ((c * g.KH + i) * g.KW + j) * T;  // the tile's next entry
            int64_t lo, hi;
            valid_cols(g, j, lo, hi);
            auto add = [&](int64_t oh, int64_t a, int64_t b, int64_t l, int64_t h) {
              const int64_t ih = oh * g.sh - g.pt + i;
              if (ih >= 0 && ih < g.H && l < h) {
                const float* in = src + (l - a);  // the entries of output columns [l, h)
                float* out = plane + ih * g.W + (l * g.sw - g.pl + j);
                // Constant strides, so the compiler vectorises (shuffles for stride 2).
                if (g.sw == 1)
                  for (int64_t q = 0; q < h - l; ++q) out[q] += in[q];
                else if (g.sw == 2)
                  for (int64_t q = 0; q < h - l; ++q) out[2 * q] += in[q];
                else
                  for (int64_t q = 0; q < h - l; ++q) out[q * g.sw] += in[q];
              }
              src += b - a;
            };
            for_tile_rows(
                g, p0, p1,
                [&](int64_t oh, int64_t a, int64_t b) {
                  const int64_t l = std::min(std::max(lo, a), b);
                  add(oh, a, b, l, std::max(std::min(hi, b), l));
                },
                [&](int64_t oh) { add(oh, 0, g.OW, lo, hi); });
          }
      },
      static_cast<double>(g.C) * g.KH * g.KW * T);
}

// Column tiles. The column matrix of one image is [K, P] (K = C*KH*KW, P = OH*OW): 576 KiB for
// a 16-channel 3x3 layer on a 32x32 map, megabytes for larger maps. It is built and consumed
// in tiles of output positions (GEMM columns) of at most kTileBytes, a multiple of
// kTileGranule positions wide (whole micro-kernel panels on the GEMMs of Pis and Jetsons, 8,
// 12 and 16 columns wide; half of AVX-512's 32), and never narrower than kTileGranule (so a
// layer with K > 4096 takes K * 16 * 4 bytes, over the cap). A map that fits is one tile, as before; one that does not is
// cut into equal tiles (rounded up to the granule), so the last tile is not a sliver.
constexpr int64_t kTileBytes = 256 * 1024;
constexpr int64_t kTileGranule = 16;

// Width (output positions) of every tile but possibly the last, which is P - (tiles-1)*width.
int64_t tile_width(const ConvGeom& g) {
  const int64_t K = g.C * g.KH * g.KW, P = g.OH * g.OW;
  if (pointwise(g)) return P;  // no columns: x is read in place
  const int64_t widest = std::max(kTileGranule, kTileBytes / (K * int64_t(sizeof(float))) / kTileGranule * kTileGranule);
  if (P <= widest) return P;
  const int64_t tiles = (P + widest - 1) / widest, even = (P + tiles - 1) / tiles;
  return (even + kTileGranule - 1) / kTileGranule * kTileGranule;  // <= widest: widest is a multiple
}

// Either many images at once (one thread each, sgemm runs inline) or, for a batch smaller than
// the thread count, one image at a time with sgemm and im2col splitting the work. Both give the
// same bits: sgemm and im2col are thread-count independent themselves.
void for_each_image(int64_t n_images, double work, const std::function<void(int64_t)>& fn) {
  if (n_images >= get_num_threads())
    parallel_for(n_images, fn, work);
  else
    for (int64_t n = 0; n < n_images; ++n) fn(n);
}

// The dW partial sums cost R*K floats per chunk beyond the first, so cap their total.
constexpr int64_t kMaxChunks = 8;
constexpr int64_t kPartialBudgetFloats = int64_t(1) << 20;  // 4 MiB

// Image chunks of the backward pass: fixed by the batch and layer sizes, never by threads.
int64_t backward_chunks(const ConvGeom& g, int64_t R, bool want_dw) {
  if (!want_dw) return g.N;
  const int64_t K = g.C * g.KH * g.KW;
  const int64_t chunks = std::min(g.N, kMaxChunks);
  return std::max<int64_t>(1, std::min(chunks, 1 + kPartialBudgetFloats / std::max<int64_t>(1, R * K)));
}

// How many per-task column buffers can be live at once (see for_each_image).
int64_t live_tasks(int64_t n_tasks, int threads) {
  if (n_tasks <= 0) return 0;
  return n_tasks >= threads ? std::min<int64_t>(threads, n_tasks) : 1;
}

// dW of a few rows without im2col (a partly trained layer's few channels, e.g. the sparse step's
// 4 of 16): for a flat_taps layer, column row (c, i, j) of the im2col matrix is x's plane c read
// from `shift` on, zero where the cell is outside the image, so each dW element is a dot product
// of dy's row with a run of x, dy's wrapping columns zeroed (one masked copy of the rows per
// kernel column j). With few rows the im2col copy cost as much as the dot products themselves
// (4 rows of the zoo CNN's conv2: ~110 of ~190 us), and the copy goes away with its scratch.
constexpr int64_t kDirectDwMaxRows = 4;
bool direct_dw(const ConvGeom& g, int64_t R, bool want_dw, bool want_dx) {
  return want_dw && !want_dx && R > 0 && R <= kDirectDwMaxRows && flat_taps(g) && !pointwise(g);
}

// For c < C: s[c * m + r] = sum over q < len of a[r][q] * b[c * ldb + q], r < m (1..4): 8 lanes
// per row, halves added, then pairs, then the tail in order, so the grouping depends on len alone.
// One call per tap (not per channel): this runs ~2000 times per image batch.
FTTE_VECTOR_CLONES
void dot_rows(const float* const* a, int m, const float* b, int64_t ldb, int64_t C, int64_t len, float* s) {
  typedef float v8f __attribute__((vector_size(32)));
  typedef float v4f __attribute__((vector_size(16)));
  const float* a0 = a[0];
  const float* a1 = a[std::min(1, m - 1)];
  const float* a2 = a[std::min(2, m - 1)];
  const float* a3 = a[std::min(3, m - 1)];  // padding rows repeat a real one, never stored
  const float* rows[4] = {a0, a1, a2, a3};
  for (int64_t c = 0; c < C; ++c) {
    const float* bc = b + c * ldb;
    v8f s0 = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, s1 = s0, s2 = s0, s3 = s0;
    int64_t q = 0;
    for (; q + 8 <= len; q += 8) {
      v8f bv, x0, x1, x2, x3;
      std::memcpy(&bv, bc + q, sizeof(bv));
      std::memcpy(&x0, a0 + q, sizeof(bv));
      std::memcpy(&x1, a1 + q, sizeof(bv));
      std::memcpy(&x2, a2 + q, sizeof(bv));
      std::memcpy(&x3, a3 + q, sizeof(bv));
      s0 += x0 * bv;
      s1 += x1 * bv;
      s2 += x2 * bv;
      s3 += x3 * bv;
    }
    const v8f acc[4] = {s0, s1, s2, s3};
    for (int r = 0; r < m; ++r) {
      v4f lo, hi;
      std::memcpy(&lo, &acc[r], sizeof(lo));
      std::memcpy(&hi, reinterpret_cast<const char*>(&acc[r]) + sizeof(lo), sizeof(hi));
      const v4f h = lo + hi;
      float t = (h[0] + h[1]) + (h[2] + h[3]);
      for (int64_t k = q; k < len; ++k) t += rows[r][k] * bc[k];
      s[c * m + r] = t;
    }
  }
}

// One image's dW rows (see direct_dw): dw[r, (c, i, j)] (+)= dy[rows[r], p] * x[c, p + shift] over
// the positions whose cell is inside the image. masked: scratch of KW * R * P floats; sums: of
// C * R floats.
void direct_dw_image(const ConvGeom& g, const float* xn, const float* dyn, const int32_t* rows, int64_t R,
                     float* dw, bool add, float* masked, float* sums) {
  const int64_t P = g.OH * g.OW, HW = g.H * g.W, taps = g.KH * g.KW;
  const float* dyr[kDirectDwMaxRows];
  for (int64_t r = 0; r < R; ++r) dyr[r] = dyn + (rows ? rows[r] : r) * P;
  for (int64_t j = 0; j < g.KW; ++j) {  // dy's rows with the columns that wrap for this j zeroed
    int64_t lo, hi;
    valid_cols(g, j, lo, hi);
    for (int64_t r = 0; r < R; ++r) {
      float* m = masked + (j * R + r) * P;
      std::memcpy(m, dyr[r], static_cast<size_t>(P) * sizeof(float));
      if (lo == 0 && hi == g.OW) continue;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        zero_few(m + oh * g.OW, lo);
        zero_few(m + oh * g.OW + hi, g.OW - hi);
      }
    }
  }
  for (int64_t i = 0; i < g.KH; ++i)
    for (int64_t j = 0; j < g.KW; ++j) {
      const FlatRun run = flat_run(g, i, j, 0, P);
      const float* a[kDirectDwMaxRows];
      for (int64_t r = 0; r < R; ++r) a[r] = masked + (j * R + r) * P + run.c0;
      const int64_t len = run.c1 - run.c0;
      if (len > 0) {
        dot_rows(a, static_cast<int>(R), xn + run.c0 + run.shift, HW, g.C, len, sums);
      } else {
        std::fill(sums, sums + g.C * R, 0.f);
      }
      for (int64_t c = 0; c < g.C; ++c) {
        float* d = dw + c * taps + i * g.KW + j;
        for (int64_t r = 0; r < R; ++r) d[r * g.C * taps] = add ? d[r * g.C * taps] + sums[c * R + r] : sums[c * R + r];
      }
    }
}

}  // namespace

void conv2d_forward(const ConvGeom& g, const float* x, const WeightView& w, const float* b, float* y) {
  const int64_t K = g.C * g.KH * g.KW, P = g.OH * g.OW, T = tile_width(g);
  const bool direct = pointwise(g);
  for_each_image(g.N, 2.0 * g.N * g.OC * P * K, [&](int64_t n) {
    const float* xn = x + n * g.C * g.H * g.W;
    float* yn = y + n * g.OC * P;
    Scratch<float> cols(direct ? 0 : static_cast<size_t>(K * T));
    // y[:, p0:p1] = W . cols[:, p0:p1], tile by tile: every output sums the same K terms in
    // the same blocks as an untiled GEMM would.
    for (int64_t p0 = 0; p0 < P; p0 += T) {
      const int64_t t = std::min(T, P - p0);
      if (!direct) im2col(g, xn, p0, p0 + t, cols.data());
      sgemm(g.OC, t, K, 1.f, w.operand(K), direct ? GemmOperand{xn, P} : GemmOperand{cols.data(), t}, 0.f,
            yn + p0, P);
    }
    if (b)
      for (int64_t oc = 0; oc < g.OC; ++oc) {
        float* row = yn + oc * P;
        const float bias = b[oc];
        for (int64_t p = 0; p < P; ++p) row[p] += bias;
      }
  });
}

void conv2d_backward(const ConvGeom& g, const float* x, const WeightView& w, const float* dy, const int32_t* rows,
                     int64_t R, float* dw, float* db, float* dx, bool accumulate) {
  const int64_t K = g.C * g.KH * g.KW, P = g.OH * g.OW;
  const bool direct = pointwise(g);
  if (R == 0) dw = db = nullptr;  // nothing selected: only dx (if asked) remains

  // db[r] = sum over images (in order) of the sum over the plane of channel rows[r].
  if (db)
    parallel_for(
        R,
        [&](int64_t r) {
          const int64_t oc = rows ? rows[r] : r;
          float total = 0.f;
          for (int64_t n = 0; n < g.N; ++n) {
            total += plane_sum(dy + (n * g.OC + oc) * P, P);
          }
          db[r] = accumulate ? db[r] + total : total;
        },
        static_cast<double>(R) * g.N * P);

  if (!dw && !dx) return;
  if (g.N == 0) {  // an empty batch has zero gradient (dx is empty itself)
    if (dw && !accumulate) std::fill(dw, dw + R * K, 0.f);
    return;
  }

  // Images are grouped into chunks fixed by N (not by the thread count). Chunk 0 writes dW
  // itself, the others a partial buffer each, added to dW in chunk order. Chunks run in waves
  // of as many as run at once (one on one thread); a wave's partials are added before the next
  // wave reuses their buffers, so only that many are held, and dW = ((c0 + c1) + c2) + ... in
  // the same order whatever the waves are.
  const int64_t chunks = backward_chunks(g, R, dw != nullptr);
  const int64_t wave = dw ? live_tasks(chunks, get_num_threads()) : chunks;  // no partials: one wave
  const int64_t slots = dw && chunks > 1 ? std::min(wave, chunks - 1) : 0;
  Scratch<float> partials(static_cast<size_t>(slots * R * K));

  // Per image, tile by tile (tiles in order, so every sum is grouped the same on any thread
  // count): dW (+)= dy[rows, tile] . cols_tile^T, then dcols_tile = W^T . dy[:, tile]
  // scattered back onto the image (the first tile zeroes dx's planes).
  const int64_t T = tile_width(g);
  const bool no_cols = direct_dw(g, R, dw != nullptr, dx != nullptr);  // dW only, few rows: no im2col
  auto run_chunk = [&](int64_t ch, float* dwc) {
    const int64_t n0 = ch * g.N / chunks, n1 = (ch + 1) * g.N / chunks;
    Scratch<float> cols(direct || no_cols ? 0 : static_cast<size_t>(K * T));
    Scratch<float> masked(no_cols ? static_cast<size_t>(g.KW * R * P + g.C * R) : 0);  // + one tap's sums
    for (int64_t n = n0; n < n1; ++n) {
      const float* xn = x ? x + n * g.C * g.H * g.W : nullptr;  // x is only needed for dW
      const float* dyn = dy + n * g.OC * P;
      if (no_cols) {
        direct_dw_image(g, xn, dyn, rows, R, dwc, !(n == n0 && !(ch == 0 && accumulate)), masked.data(),
                        masked.data() + g.KW * R * P);
        continue;
      }
      float* dxn = dx ? dx + n * g.C * g.H * g.W : nullptr;
      for (int64_t p0 = 0; p0 < P; p0 += T) {
        const int64_t t = std::min(T, P - p0);
        if (dw) {
          // Reads the selected rows of dy in place.
          if (!direct) im2col(g, xn, p0, p0 + t, cols.data());
          const bool first = n == n0 && p0 == 0 && !(ch == 0 && accumulate);
          sgemm(R, K, t, 1.f, GemmOperand{dyn + p0, P, false, rows},
                direct ? GemmOperand{xn, P, true} : GemmOperand{cols.data(), t, true}, first ? 0.f : 1.f, dwc, K);
        }
        if (dx) {  // every output channel contributes
          if (direct) {
            sgemm(K, P, g.OC, 1.f, w.operand(K, true), GemmOperand{dyn, P}, 0.f, dxn, P);
          } else {
            sgemm(K, t, g.OC, 1.f, w.operand(K, true), GemmOperand{dyn + p0, P}, 0.f, cols.data(), t);
            col2im(g, cols.data(), p0, p0 + t, dxn, p0 == 0);
          }
        }
      }
    }
  };
  const double work = (dw ? 2.0 * R * K * P : 0.0) * g.N + (dx ? 2.0 * K * P * g.OC : 0.0) * g.N;
  for (int64_t c0 = 0; c0 < chunks; c0 += wave) {
    const int64_t c1 = std::min(chunks, c0 + wave);
    // Chunk ch's partial buffer: slot ch - 1 in the first wave (chunk 0 writes dW), ch - c0 after.
    auto dw_of = [&](int64_t ch) {
      return !dw ? nullptr : ch == 0 ? dw : partials.data() + (c0 == 0 ? ch - 1 : ch - c0) * R * K;
    };
    for_each_image(c1 - c0, work * double(c1 - c0) / double(chunks),
                   [&](int64_t k) { run_chunk(c0 + k, dw_of(c0 + k)); });
    if (dw && c1 > std::max<int64_t>(c0, 1)) {
      const int64_t first = std::max<int64_t>(c0, 1), total = R * K, block = 4096;
      parallel_for(
          (total + block - 1) / block,
          [&](int64_t t) {
            const int64_t i0 = t * block, i1 = std::min(total, i0 + block);
            for (int64_t ch = first; ch < c1; ++ch) {
              const float* part = dw_of(ch);
              for (int64_t i = i0; i < i1; ++i) dw[i] += part[i];
            }
          },
          static_cast<double>(total) * double(c1 - first));
    }
  }
}

size_t conv2d_scratch_bytes(const ConvGeom& g, bool backward, int64_t R, bool want_dw, bool want_dx, int threads,
                            bool int8_weight) {
  const int64_t K = g.C * g.KH * g.KW, P = g.OH * g.OW, T = tile_width(g);
  const int64_t cols = pointwise(g) ? 0 : K * T;
  threads = std::max(threads, 1);
  // The tiles' widths: T, and a narrower last one. GEMM packing can differ between the two
  // (K blocking and the dot path depend on the width), so the larger of both is held.
  const int64_t last = P > 0 ? P - (P - 1) / T * T : 0;
  const int64_t widths[2] = {T, last};
  // Each live task holds its columns and the packing panels of its own GEMM calls.
  const float* any = nullptr;
  // Only whether the weight operand is int8 matters for sizing, never its values.
  static const int8_t any_q[1] = {0};
  const GemmOperand wq{any, K, false, nullptr, int8_weight ? any_q : nullptr, nullptr};
  GemmOperand wq_t = wq;
  wq_t.trans = true;
  if (!backward) {
    size_t pack = 0;
    for (int64_t t : widths)
      pack = std::max(pack, sgemm_scratch_bytes(g.OC, t, K, wq, GemmOperand{any, t}));
    return (static_cast<size_t>(cols) * sizeof(float) + pack) * static_cast<size_t>(live_tasks(g.N, threads));
  }
  if (R == 0) want_dw = false;
  if ((!want_dw && !want_dx) || g.N == 0) return 0;
  const int64_t chunks = backward_chunks(g, R, want_dw);
  const int64_t partials = want_dw && chunks > 1 ? std::min(live_tasks(chunks, threads), chunks - 1) * R * K : 0;
  if (direct_dw(g, R, want_dw, want_dx))  // no columns, no GEMM: dy's masked rows
    return static_cast<size_t>(partials) * sizeof(float) +
           static_cast<size_t>(g.KW * R * P + g.C * R) * sizeof(float) * static_cast<size_t>(live_tasks(chunks, threads));
  static const int32_t some_rows[1] = {0};
  size_t pack = 0;
  for (int64_t t : widths) {
    if (want_dw)
      pack = std::max(pack, sgemm_scratch_bytes(R, K, t, GemmOperand{any, P, false, R < g.OC ? some_rows : nullptr},
                                                GemmOperand{any, t, true}));
    if (want_dx)
      pack = std::max(pack, sgemm_scratch_bytes(K, pointwise(g) ? P : t, g.OC, wq_t, GemmOperand{any, P}));
  }
  return static_cast<size_t>(partials) * sizeof(float) +
         (static_cast<size_t>(cols) * sizeof(float) + pack) * static_cast<size_t>(live_tasks(chunks, threads));
}

void conv2d_backward_sgd(const ConvGeom& g, const float* x, const WeightView& w, float* b, const float* dy,
                         const int32_t* rows, int64_t R, float* dx, bool train_bias, float* vw, float* vb,
                         const SgdStep& opt) {
  const int64_t K = g.C * g.KH * g.KW;
  // dx first: it must read the weights as forward used them, before any channel moves.
  if (dx) conv2d_backward(g, nullptr, w, dy, nullptr, g.OC, nullptr, nullptr, dx, false);
  if (train_bias && g.OC > 0) {
    Scratch<float> db(static_cast<size_t>(g.OC));
    conv2d_backward(g, nullptr, w, dy, nullptr, g.OC, nullptr, db.data(), nullptr, false);
    sgd_update_rows(b, g.OC, 1, nullptr, g.OC, db.data(), vb, opt.lr, opt.momentum, opt.weight_decay);
  }
  if (R <= 0) return;
  const int64_t T = grad_tile_rows(R, K, kConvGradTileBytes);
  Scratch<float> tile(static_cast<size_t>(T * K));
  // All channels in several tiles: a tile's channels are named by an index (conv2d_backward
  // gathers dy's rows).
  Scratch<int32_t> all(!rows && T < R ? static_cast<size_t>(T) : 0);
  float* wf = const_cast<float*>(w.f);  // the rows that train: the binding checked them writable
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    const int64_t t = std::min(T, R - r0);
    const int32_t* sel = rows ? rows + r0 : nullptr;
    if (!rows && T < R) {
      for (int64_t r = 0; r < t; ++r) all[r] = static_cast<int32_t>(r0 + r);
      sel = all.data();
    }
    conv2d_backward(g, x, w, dy, sel, t, tile.data(), nullptr, nullptr, false);
    float* vt = opt.momentum != 0.f ? vw + r0 * K : nullptr;
    if (w.mixed())  // trained channel rows[r] is compact row r: the tile's rows are rows r0.. of w.f
      sgd_update_rows(wf + r0 * K, t, K, nullptr, t, tile.data(), vt, opt.lr, opt.momentum, opt.weight_decay);
    else
      sgd_update_rows(wf, g.OC, K, sel, t, tile.data(), vt, opt.lr, opt.momentum, opt.weight_decay);
  }
}

size_t conv2d_backward_sgd_scratch_bytes(const ConvGeom& g, int64_t R, bool train_bias, bool want_dx, int threads,
                                         bool int8_weight) {
  const int64_t K = g.C * g.KH * g.KW;
  size_t peak = 0;
  if (want_dx) peak = conv2d_scratch_bytes(g, true, g.OC, false, true, threads, int8_weight);
  if (train_bias) peak = std::max(peak, static_cast<size_t>(g.OC) * sizeof(float));
  if (R > 0) {
    const int64_t T = grad_tile_rows(R, K, kConvGradTileBytes), last = R - (R - 1) / T * T;
    const size_t index = T < R && R == g.OC ? static_cast<size_t>(T) * sizeof(int32_t) : 0;
    size_t calls = 0;
    for (int64_t t : {T, last}) calls = std::max(calls, conv2d_scratch_bytes(g, true, t, true, false, threads));
    peak = std::max(peak, static_cast<size_t>(T * K) * sizeof(float) + index + calls);
  }
  return peak;
}

}  // namespace ftte

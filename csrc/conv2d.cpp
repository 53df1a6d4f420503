// Convolution as im2col + sgemm. Scratch is one column matrix [C*KH*KW, OH*OW] per image in
// flight (never the whole batch): on a Pi the batch of columns would not fit next to the model.
// Results never depend on the thread count: images are independent, and the one sum over
// images (dW) is grouped into chunks fixed by the batch size, added in chunk order.
#include "conv2d.h"

#include <algorithm>
#include <cstring>

#include "gemm.h"
#include "parallel.h"
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

// cols[(c*KH + i)*KW + j][oh*OW + ow] = x[c][oh*sh - pt + i][ow*sw - pl + j], zero in padding.
// Split over input channels (inline when already inside a per-image parallel loop).
void im2col(const ConvGeom& g, const float* x, float* cols) {
  const int64_t P = g.OH * g.OW;
  parallel_for(
      g.C,
      [&](int64_t c) {
        for (int64_t i = 0; i < g.KH; ++i)
          for (int64_t j = 0; j < g.KW; ++j) {
            float* dst = cols + ((c * g.KH + i) * g.KW + j) * P;
            int64_t lo, hi;
            valid_cols(g, j, lo, hi);
            for (int64_t oh = 0; oh < g.OH; ++oh, dst += g.OW) {
              int64_t ih = oh * g.sh - g.pt + i;
              if (ih < 0 || ih >= g.H || lo == hi) {
                std::fill(dst, dst + g.OW, 0.f);
                continue;
              }
              // Input cell of output column ow: src[(ow - lo) * sw]; only valid columns are read.
              const float* src = x + (c * g.H + ih) * g.W + (lo * g.sw - g.pl + j);
              std::fill(dst, dst + lo, 0.f);
              if (g.sw == 1)
                std::memcpy(dst + lo, src, static_cast<size_t>(hi - lo) * sizeof(float));
              else
                for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[(ow - lo) * g.sw];
              std::fill(dst + hi, dst + g.OW, 0.f);
            }
          }
      },
      static_cast<double>(g.C) * g.KH * g.KW * P);
}

// The adjoint of im2col: dx (zeroed here) += every column entry at the cell it was read from.
// Each channel's plane only receives from that channel's rows, so the split over channels
// never has two threads adding into one cell.
void col2im(const ConvGeom& g, const float* cols, float* dx) {
  const int64_t P = g.OH * g.OW;
  parallel_for(
      g.C,
      [&](int64_t c) {
        float* plane = dx + c * g.H * g.W;
        std::fill(plane, plane + g.H * g.W, 0.f);
        for (int64_t i = 0; i < g.KH; ++i)
          for (int64_t j = 0; j < g.KW; ++j) {
            const float* src = cols + ((c * g.KH + i) * g.KW + j) * P;
            int64_t lo, hi;
            valid_cols(g, j, lo, hi);
            for (int64_t oh = 0; oh < g.OH; ++oh, src += g.OW) {
              int64_t ih = oh * g.sh - g.pt + i;
              if (ih < 0 || ih >= g.H || lo == hi) continue;
              float* dst = plane + ih * g.W + (lo * g.sw - g.pl + j);
              for (int64_t ow = lo; ow < hi; ++ow) dst[(ow - lo) * g.sw] += src[ow];
            }
          }
      },
      static_cast<double>(g.C) * g.KH * g.KW * P);
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

}  // namespace

void conv2d_forward(const ConvGeom& g, const float* x, const float* w, const float* b, float* y) {
  const int64_t K = g.C * g.KH * g.KW, P = g.OH * g.OW;
  const bool direct = pointwise(g);
  for_each_image(g.N, 2.0 * g.N * g.OC * P * K, [&](int64_t n) {
    const float* xn = x + n * g.C * g.H * g.W;
    float* yn = y + n * g.OC * P;
    Scratch<float> cols(direct ? 0 : static_cast<size_t>(K * P));
    if (!direct) im2col(g, xn, cols.data());
    sgemm(g.OC, P, K, 1.f, GemmOperand{w, K}, GemmOperand{direct ? xn : cols.data(), P}, 0.f, yn, P);
    if (b)
      for (int64_t oc = 0; oc < g.OC; ++oc) {
        float* row = yn + oc * P;
        const float bias = b[oc];
        for (int64_t p = 0; p < P; ++p) row[p] += bias;
      }
  });
}

void conv2d_backward(const ConvGeom& g, const float* x, const float* w, const float* dy, const int32_t* rows,
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
            const float* plane = dy + (n * g.OC + oc) * P;
            float s = 0.f;
            for (int64_t p = 0; p < P; ++p) s += plane[p];
            total += s;
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
  // itself, the others their own partial buffer; partials are added in chunk order at the end.
  const int64_t chunks = backward_chunks(g, R, dw != nullptr);
  Scratch<float> partials(dw ? static_cast<size_t>((chunks - 1) * R * K) : 0);

  auto run_chunk = [&](int64_t ch) {
    const int64_t n0 = ch * g.N / chunks, n1 = (ch + 1) * g.N / chunks;
    float* dwc = ch == 0 ? dw : partials.data() + (ch - 1) * R * K;
    Scratch<float> cols(direct ? 0 : static_cast<size_t>(K * P));
    for (int64_t n = n0; n < n1; ++n) {
      const float* xn = x ? x + n * g.C * g.H * g.W : nullptr;  // x is only needed for dW
      const float* dyn = dy + n * g.OC * P;
      if (dw) {
        // dW[r, :] (+)= dy_n[rows[r], :] . cols_n^T, reading the selected rows of dy in place.
        if (!direct) im2col(g, xn, cols.data());
        const bool first = n == n0 && !(ch == 0 && accumulate);
        sgemm(R, K, P, 1.f, GemmOperand{dyn, P, false, rows}, GemmOperand{direct ? xn : cols.data(), P, true},
              first ? 0.f : 1.f, dwc, K);
      }
      if (dx) {
        // dcols = W^T . dy_n over all output channels, then scattered back onto the image.
        float* dxn = dx + n * g.C * g.H * g.W;
        if (direct) {
          sgemm(K, P, g.OC, 1.f, GemmOperand{w, K, true}, GemmOperand{dyn, P}, 0.f, dxn, P);
        } else {
          sgemm(K, P, g.OC, 1.f, GemmOperand{w, K, true}, GemmOperand{dyn, P}, 0.f, cols.data(), P);
          col2im(g, cols.data(), dxn);
        }
      }
    }
  };
  const double work = (dw ? 2.0 * R * K * P : 0.0) * g.N + (dx ? 2.0 * K * P * g.OC : 0.0) * g.N;
  for_each_image(chunks, work, run_chunk);

  if (dw && chunks > 1) {
    const int64_t total = R * K, block = 4096;
    parallel_for(
        (total + block - 1) / block,
        [&](int64_t t) {
          const int64_t i0 = t * block, i1 = std::min(total, i0 + block);
          for (int64_t ch = 1; ch < chunks; ++ch) {
            const float* part = partials.data() + (ch - 1) * total;
            for (int64_t i = i0; i < i1; ++i) dw[i] += part[i];
          }
        },
        static_cast<double>(total) * (chunks - 1));
  }
}

size_t conv2d_scratch_bytes(const ConvGeom& g, bool backward, int64_t R, bool want_dw, bool want_dx, int threads) {
  const int64_t K = g.C * g.KH * g.KW, P = g.OH * g.OW;
  const int64_t cols = pointwise(g) ? 0 : K * P;
  threads = std::max(threads, 1);
  if (!backward) return static_cast<size_t>(cols * live_tasks(g.N, threads)) * sizeof(float);
  if (R == 0) want_dw = false;
  if ((!want_dw && !want_dx) || g.N == 0) return 0;
  const int64_t chunks = backward_chunks(g, R, want_dw);
  const int64_t partials = want_dw ? (chunks - 1) * R * K : 0;
  return static_cast<size_t>(partials + cols * live_tasks(chunks, threads)) * sizeof(float);
}

}  // namespace ftte

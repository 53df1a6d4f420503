// Broadcast elementwise kernels and channel concat. Forward tasks are fixed blocks of rows of
// independent elements; each reduced entry of a broadcast gradient is summed by one task in
// a's memory order, so no result depends on the thread count.
#include "elementwise.h"

#include <algorithm>
#include <cstring>

#include "parallel.h"

namespace ftte {
namespace {

constexpr int64_t kBlock = 16384;

// b's offset for the row `o` over all but the last merged axis.
inline int64_t b_offset_of_row(const Broadcast& g, int64_t o) {
  int64_t off = 0;
  for (int64_t i = static_cast<int64_t>(g.dim.size()) - 2; i >= 0; --i) {
    const int64_t d = g.dim[static_cast<size_t>(i)];
    off += (o % d) * g.bstride[static_cast<size_t>(i)];
    o /= d;
  }
  return off;
}

template <class Op>
void binary_forward(const Broadcast& g, const float* a, const float* b, float* y, bool acc, const Op& op) {
  if (g.total == 0) return;
  // Tasks: several short rows each, or pieces of one long row (a same-shape add is one row).
  const int64_t L = g.dim.back(), sL = g.bstride.back(), rows = g.total / L;
  const int64_t per = std::max<int64_t>(1, kBlock / L), pieces = (L + kBlock - 1) / kBlock;
  const int64_t n_tasks = per > 1 ? (rows + per - 1) / per : rows * pieces;
  parallel_for(
      n_tasks,
      [&](int64_t t) {
        int64_t o0 = t * per, o1 = std::min(rows, o0 + per), l0 = 0, l1 = L;
        if (per == 1) {
          o0 = t / pieces;
          o1 = o0 + 1;
          l0 = (t % pieces) * kBlock;
          l1 = std::min(L, l0 + kBlock);
        }
        for (int64_t o = o0; o < o1; ++o) {
          const float* ap = a + o * L;
          float* yp = y + o * L;
          const float* bp = b + b_offset_of_row(g, o);
          if (sL == 0) {
            const float bv = bp[0];
            if (acc) {
#pragma GCC ivdep
              for (int64_t l = l0; l < l1; ++l) yp[l] += op(ap[l], bv);
            } else {
#pragma GCC ivdep
              for (int64_t l = l0; l < l1; ++l) yp[l] = op(ap[l], bv);
            }
          } else if (acc) {
#pragma GCC ivdep
            for (int64_t l = l0; l < l1; ++l) yp[l] += op(ap[l], bp[l]);
          } else {
#pragma GCC ivdep
            for (int64_t l = l0; l < l1; ++l) yp[l] = op(ap[l], bp[l]);
          }
        }
      },
      static_cast<double>(g.total));
}

// db[j] = sum of f(off) over every a offset `off` that maps to b[j], in increasing offset order.
template <class F>
void reduce_to_b(const Broadcast& g, float* db, bool accumulate, const F& f) {
  if (g.total == 0) {
    if (!accumulate) std::fill(db, db + g.bsize, 0.f);
    return;
  }
  std::vector<int64_t> fd, fs, bd, bs;  // full and broadcast axes: sizes and a strides
  for (size_t i = 0; i < g.dim.size(); ++i) {
    if (g.bstride[i] != 0) {
      fd.push_back(g.dim[i]);
      fs.push_back(g.astride[i]);
    } else {
      bd.push_back(g.dim[i]);
      bs.push_back(g.astride[i]);
    }
  }
  if (bd.empty()) {  // nothing is broadcast: b's entry j is a's entry j, an elementwise pass
    const int64_t n = g.total;
    parallel_for(
        (n + kBlock - 1) / kBlock,
        [&](int64_t t) {
          const int64_t i1 = std::min(n, (t + 1) * kBlock);
          if (accumulate) {
            for (int64_t i = t * kBlock; i < i1; ++i) db[i] += f(i);
          } else {
            for (int64_t i = t * kBlock; i < i1; ++i) db[i] = f(i);
          }
        },
        static_cast<double>(n));
    return;
  }
  int64_t inner = 1, inner_s = 0, outer = 1;
  if (!bd.empty()) {
    inner = bd.back();
    inner_s = bs.back();
    for (size_t i = 0; i + 1 < bd.size(); ++i) outer *= bd[i];
  }
  const int64_t per_j = g.total / g.bsize;
  const int64_t per = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, per_j));
  parallel_for(
      (g.bsize + per - 1) / per,
      [&](int64_t t) {
        const int64_t j1 = std::min(g.bsize, (t + 1) * per);
        for (int64_t j = t * per; j < j1; ++j) {
          int64_t base = 0, r = j;
          for (int64_t i = static_cast<int64_t>(fd.size()) - 1; i >= 0; --i) {
            base += (r % fd[static_cast<size_t>(i)]) * fs[static_cast<size_t>(i)];
            r /= fd[static_cast<size_t>(i)];
          }
          float acc = 0.f;
          for (int64_t q = 0; q < outer; ++q) {
            int64_t off = base, rq = q;
            for (int64_t i = static_cast<int64_t>(bd.size()) - 2; i >= 0; --i) {
              off += (rq % bd[static_cast<size_t>(i)]) * bs[static_cast<size_t>(i)];
              rq /= bd[static_cast<size_t>(i)];
            }
            for (int64_t l = 0; l < inner; ++l) acc += f(off + l * inner_s);
          }
          db[j] = accumulate ? db[j] + acc : acc;
        }
      },
      2.0 * static_cast<double>(g.total));
}

}  // namespace

Broadcast make_broadcast(const std::vector<int64_t>& ashape, const std::vector<int64_t>& bshape) {
  Broadcast g;
  const size_t nd = ashape.size(), pad = nd - bshape.size();
  g.total = 1;
  g.bsize = 1;
  for (int64_t d : ashape) g.total *= d;
  for (int64_t d : bshape) g.bsize *= d;
  std::vector<bool> full;
  for (size_t i = 0; i < nd; ++i) {
    const int64_t ad = ashape[i], bdim = i < pad ? 1 : bshape[i - pad];
    if (ad == 1) continue;
    const bool f = bdim == ad;
    if (!g.dim.empty() && full.back() == f) {
      g.dim.back() *= ad;
    } else {
      g.dim.push_back(ad);
      full.push_back(f);
    }
  }
  if (g.dim.empty()) {
    g.dim.push_back(1);
    full.push_back(true);
  }
  const size_t n = g.dim.size();
  g.astride.assign(n, 0);
  g.bstride.assign(n, 0);
  int64_t as = 1, bsz = 1;
  for (size_t k = n; k-- > 0;) {
    g.astride[k] = as;
    as *= g.dim[k];
    if (full[k]) {
      g.bstride[k] = bsz;
      bsz *= g.dim[k];
    }
  }
  return g;
}

void add_forward(const Broadcast& g, const float* a, const float* b, float* y) {
  binary_forward(g, a, b, y, false, [](float u, float v) { return u + v; });
}

void mul_forward(const Broadcast& g, const float* a, const float* b, float* y) {
  binary_forward(g, a, b, y, false, [](float u, float v) { return u * v; });
}

void add_backward(const Broadcast& g, const float* dy, float* da, float* db, bool accumulate) {
  if (db) reduce_to_b(g, db, accumulate, [dy](int64_t i) { return dy[i]; });
  if (!da || g.total == 0) return;
  if (accumulate) {
    const int64_t n = g.total;
    parallel_for(
        (n + kBlock - 1) / kBlock,
        [&](int64_t t) {
          const int64_t i1 = std::min(n, (t + 1) * kBlock);
#pragma GCC ivdep
          for (int64_t i = t * kBlock; i < i1; ++i) da[i] += dy[i];
        },
        static_cast<double>(n));
  } else if (da != dy) {
    std::memcpy(da, dy, static_cast<size_t>(g.total) * sizeof(float));
  }
}

void mul_backward(const Broadcast& g, const float* a, const float* b, const float* dy, float* da, float* db,
                  bool accumulate) {
  // db first: da may be dy itself.
  if (db) reduce_to_b(g, db, accumulate, [dy, a](int64_t i) { return dy[i] * a[i]; });
  if (da) binary_forward(g, dy, b, da, accumulate, [](float u, float v) { return u * v; });
}

void concat_forward(const std::vector<const float*>& xs, const std::vector<int64_t>& cs, float* y, int64_t N,
                    int64_t S) {
  int64_t C = 0;
  for (int64_t c : cs) C += c;
  parallel_for(
      N,
      [&](int64_t n) {
        float* yp = y + n * C * S;
        for (size_t i = 0; i < xs.size(); ++i) {
          const int64_t len = cs[i] * S;
          if (len) std::memcpy(yp, xs[i] + n * len, static_cast<size_t>(len) * sizeof(float));
          yp += len;
        }
      },
      static_cast<double>(N * C * S));
}

void concat_backward(const float* dy, const std::vector<float*>& dxs, const std::vector<int64_t>& cs, int64_t N,
                     int64_t S, bool accumulate) {
  int64_t C = 0;
  for (int64_t c : cs) C += c;
  parallel_for(
      N,
      [&](int64_t n) {
        const float* dp = dy + n * C * S;
        for (size_t i = 0; i < dxs.size(); ++i) {
          const int64_t len = cs[i] * S;
          float* o = dxs[i] ? dxs[i] + n * len : nullptr;
          if (o && accumulate) {
#pragma GCC ivdep
            for (int64_t l = 0; l < len; ++l) o[l] += dp[l];
          } else if (o && len) {
            std::memcpy(o, dp, static_cast<size_t>(len) * sizeof(float));
          }
          dp += len;
        }
      },
      static_cast<double>(N * C * S));
}

}  // namespace ftte

// Packed, cache-blocked SGEMM (BLIS structure):
//   for jc over N in NC blocks, pc over K in KC blocks, ic over M in MC blocks:
//     pack op(B)[pc:, jc:] into NR-column panels and op(A)[ic:, pc:] into MR-row panels
//     (transposes and index gathers are applied here, so the micro-kernel only ever sees
//     unit-stride panels; operands already in that layout are read in place when a packed
//     copy would be reused too little), then run the MR x NR micro-kernel over C tiles.
// Threads split only tiles of C; every C element sums its K blocks in the same order on one
// thread, so the result is bit-identical for any thread count.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "gemm_kernel.h"
#include "parallel.h"
#include "workspace.h"

namespace ftte {
namespace gemm_detail {
namespace {

// ---- generic micro-kernel: GCC/Clang vector extensions, lowered to SSE2 / NEON / scalar ----
typedef float v4sf __attribute__((vector_size(16)));

template <int MR, int NV>  // NR = 4 * NV
void ukernel_generic(int64_t kc, const float* A, int64_t as, const float* B, int64_t bs, float* C, int64_t ldc,
                     float alpha, float beta, int m, int n) {
  constexpr int NR = 4 * NV;
  v4sf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = v4sf{0.f, 0.f, 0.f, 0.f};
  for (int64_t k = 0; k < kc; ++k) {
    v4sf b[NV];
    std::memcpy(b, B, sizeof(b));  // memcpy: no aliasing/alignment assumptions, still one load
    for (int i = 0; i < MR; ++i) {
      const float s = A[i];
      const v4sf a = {s, s, s, s};
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
    A += as;
    B += bs;
  }
  if (m < MR || n < NR) {  // edge tile: same arithmetic, element by element
    float t[MR][NR];
    std::memcpy(t, acc, sizeof(t));
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        float& c = C[i * ldc + j];
        const float r = alpha * t[i][j];
        c = beta == 0.f ? r : (beta == 1.f ? r + c : r + beta * c);
      }
    return;
  }
  const v4sf va = {alpha, alpha, alpha, alpha};
  const v4sf vb = {beta, beta, beta, beta};
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    for (int v = 0; v < NV; ++v) {
      v4sf r = va * acc[i][v];
      if (beta != 0.f) {
        v4sf old;
        std::memcpy(&old, c + 4 * v, sizeof(old));
        r += beta == 1.f ? old : vb * old;
      }
      std::memcpy(c + 4 * v, &r, sizeof(r));
    }
  }
}

// C[m x n] = alpha * A B^T + beta * C by dot products over K, for the dot path below: rows a[i]
// and b[j] are read in place (no packing). Same kDotMR x kDotNR block shape as the AVX2 version.
void dot_block_generic(int64_t K, const float* const* a, const float* const* b, float* C, int64_t ldc,
                       float alpha, float beta, int m, int n) {
  v4sf acc[kDotMR][kDotNR];
  for (int i = 0; i < kDotMR; ++i)
    for (int j = 0; j < kDotNR; ++j) acc[i][j] = v4sf{0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    v4sf x[kDotMR];
    for (int i = 0; i < kDotMR; ++i) std::memcpy(&x[i], a[i] + k, sizeof(v4sf));
    for (int j = 0; j < kDotNR; ++j) {
      v4sf y;
      std::memcpy(&y, b[j] + k, sizeof(y));
      for (int i = 0; i < kDotMR; ++i) acc[i][j] += x[i] * y;
    }
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = (acc[i][j][0] + acc[i][j][1]) + (acc[i][j][2] + acc[i][j][3]);
      for (int64_t t = k; t < K; ++t) s += a[i][t] * b[j][t];
      float& c = C[i * ldc + j];
      const float r = alpha * s;
      c = beta == 0.f ? r : (beta == 1.f ? r + c : r + beta * c);
    }
}

// FTTE_GEMM_GENERIC_MR / _NV override the shape so tests can run the aarch64 shape on x86.
#if defined(FTTE_GEMM_GENERIC_MR) && defined(FTTE_GEMM_GENERIC_NV)
constexpr int kGenMR = FTTE_GEMM_GENERIC_MR, kGenNV = FTTE_GEMM_GENERIC_NV;
#elif defined(__aarch64__)
// 32 NEON registers: 8 x 12 uses 24 accumulators + 3 B vectors + 1 broadcast.
constexpr int kGenMR = 8, kGenNV = 3;
#else
// 16 vector registers (SSE2, armv7 NEON): 6 x 8 uses 12 accumulators + 2 B + 1 broadcast.
constexpr int kGenMR = 6, kGenNV = 2;
#endif
static_assert(kGenMR >= 1 && kGenMR <= 16 && kGenNV >= 1 && kGenNV <= 4, "generic micro-kernel shape");

KernelInfo generic_kernel() { return {"generic", kGenMR, 4 * kGenNV, &ukernel_generic<kGenMR, kGenNV>}; }

// The widest kernel the CPU runs, unless FTTE_GEMM_KERNEL names a narrower one ("avx2",
// "generic": tests and benchmarks compare them on one machine).
KernelInfo choose_kernel() {
  const char* env = std::getenv("FTTE_GEMM_KERNEL");
  const bool force_generic = env && std::strcmp(env, "generic") == 0;
  const bool force_avx2 = env && std::strcmp(env, "avx2") == 0;
  (void)force_generic;
  (void)force_avx2;
#if defined(FTTE_HAVE_AVX2_KERNEL) && FTTE_HAVE_AVX2_KERNEL
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!force_generic && !force_avx2 && avx2 && __builtin_cpu_supports("avx512f")) return avx512_kernel();
  if (!force_generic && avx2) return avx2_kernel();
#endif
  return generic_kernel();
}

const KernelInfo& kernel() {
  static const KernelInfo k = choose_kernel();
  return k;
}

// Cache blocking. KC * NR floats of B (16 KB for 16 x 256) stay in L1 while a micro-panel of A
// streams; MC x KC of A (144 KB) sits in L2; NC bounds the packed B block (1 MB at KC = 256),
// which matters on 1 GB boards more than the last few percent of speed.
constexpr int64_t kKC = 256, kMC = 144, kNC = 1024;
// Compute tasks are tiles of this many micro-tiles (fixed, not thread-count dependent).
constexpr int64_t kTaskRowPanels = 8, kTaskColElems = 64;
// Read an operand in place (no packing) when the other operand has at most this many rows/cols.
constexpr int64_t kDirectMaxOther = 64;

// Waking the pool costs several microseconds (much more when other processes hold the cores),
// and a GEMM opens two regions per block, so a compute region goes parallel only when it holds
// at least ~20 us of single-thread work; below that it runs inline.
constexpr double kMinParallelRegionFlops = 1.0e6;
inline double region_work(double flops) { return flops >= kMinParallelRegionFlops ? flops : 0.0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dot products win when both operands run along k (A plain, B transposed), the batch is small
// (a packed W^T panel would be reused only a few times) and K is long enough to amortise the
// horizontal sums (measured with AVX2: a loss at K = 64, a 1.2-1.7x win at K >= 128). The rule
// is the same for every micro-kernel on purpose: the path decides the workspace (none here), so
// a hub on x86-64 predicts the memory an ARM device really takes. FTTE_GEMM_DOT=0 disables it.
bool use_dot_path(int64_t M, int64_t K, const GemmOperand& A, const GemmOperand& B) {
  static const bool enabled = [] {
    const char* e = std::getenv("FTTE_GEMM_DOT");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return enabled && !A.trans && B.trans && M <= 64 && K >= 128 && !A.q;  // an int8 B: see sgemm_dot
}

typedef int v4si __attribute__((vector_size(16)));
#if defined(__clang__)
#define FTTE_SHUF(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define FTTE_SHUF(a, b, i0, i1, i2, i3) __builtin_shuffle(a, b, v4si{i0, i1, i2, i3})
#endif

// dst[k*LD + r] = src[r][k] for r < R (compile-time), k < kc: the transposing copy both packers
// need (A rows -> MR-interleaved panel, B^T rows -> NR-interleaved panel). Four rows at a time
// go through a 4x4 register transpose so reads and writes stay vector-wide.
template <int R, int LD>
inline void transpose_rows(const float* const* src, int64_t kc, float* dst) {
  int64_t k = 0;
  constexpr int R4 = R / 4 * 4;
  for (; k + 4 <= kc; k += 4) {
    for (int g = 0; g < R4; g += 4) {
      v4sf r0, r1, r2, r3;
      std::memcpy(&r0, src[g] + k, 16);
      std::memcpy(&r1, src[g + 1] + k, 16);
      std::memcpy(&r2, src[g + 2] + k, 16);
      std::memcpy(&r3, src[g + 3] + k, 16);
      const v4sf t0 = FTTE_SHUF(r0, r1, 0, 4, 1, 5), t1 = FTTE_SHUF(r0, r1, 2, 6, 3, 7);
      const v4sf t2 = FTTE_SHUF(r2, r3, 0, 4, 1, 5), t3 = FTTE_SHUF(r2, r3, 2, 6, 3, 7);
      const v4sf o0 = FTTE_SHUF(t0, t2, 0, 1, 4, 5), o1 = FTTE_SHUF(t0, t2, 2, 3, 6, 7);
      const v4sf o2 = FTTE_SHUF(t1, t3, 0, 1, 4, 5), o3 = FTTE_SHUF(t1, t3, 2, 3, 6, 7);
      std::memcpy(dst + (k + 0) * LD + g, &o0, 16);
      std::memcpy(dst + (k + 1) * LD + g, &o1, 16);
      std::memcpy(dst + (k + 2) * LD + g, &o2, 16);
      std::memcpy(dst + (k + 3) * LD + g, &o3, 16);
    }
    for (int r = R4; r < R; ++r)
      for (int q = 0; q < 4; ++q) dst[(k + q) * LD + r] = src[r][k + q];
  }
  for (; k < kc; ++k)
    for (int r = 0; r < R; ++r) dst[k * LD + r] = src[r][k];
}

// ---- int8 operands: dequantised while packing (value = q * scale of its source row) ----------

// dst[k] = q[k] * scale for k < n: a contiguous run of one source row, vectorised.
inline void dequant_run(const int8_t* q, float scale, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(q[k]) * scale;
}

// Source row s of an int8 or mixed operand: a float row of a mixed operand (read in place), or
// an int8 row with its scale.
struct SourceRow {
  const float* f;
  const int8_t* q;
  float scale;
};
inline SourceRow source_row(const GemmOperand& X, int64_t s) {
  if (X.row_slot) {
    const int32_t slot = X.row_slot[s];
    if (slot >= 0) return SourceRow{X.data + slot * X.ld, nullptr, 0.f};
    s = ~slot;
  }
  return SourceRow{nullptr, X.q + s * X.ld, X.q_scale[s]};
}

// Entries [p0, p0 + n) of source row s: a pointer to them, dequantised into `tile` when int8.
inline const float* row_run(const GemmOperand& X, int64_t s, int64_t p0, int64_t n, float* tile) {
  const SourceRow r = source_row(X, s);
  if (r.f) return r.f + p0;
  dequant_run(r.q + p0, r.scale, n, tile);
  return tile;
}

// The transposing pack (pack_a plain, pack_b transposed) from an int8 or mixed source: each of
// the R source rows' kc entries is dequantised into a stack tile first (kc <= kKC, so at most
// 16 x 256 floats; float rows of a mixed source are read in place), then the float transpose
// runs as for a float source.
template <int R, int LD>
void pack_rows_q(const GemmOperand& X, const int64_t* src_rows, int64_t p0, int64_t kc, float* dst) {
  float tile[R * kKC];
  const float* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = row_run(X, src_rows[r], p0, kc, tile + r * kc);
  transpose_rows<R, LD>(rows, kc, dst);
}

// The copying pack (pack_a transposed, pack_b plain) from an int8 or mixed source: panel row k
// is source row p0 + k, columns col(0..W), padded with zeros to W = MR or NR.
template <int W>
void pack_cols_q(const GemmOperand& X, int64_t c0, int64_t cols, int64_t p0, int64_t kc, float* dst) {
  for (int64_t k = 0; k < kc; ++k) {
    const SourceRow s = source_row(X, p0 + k);
    float* d = dst + k * W;
    if (s.f) {
      for (int64_t jj = 0; jj < W; ++jj) d[jj] = jj < cols ? s.f[X.index ? X.index[c0 + jj] : c0 + jj] : 0.f;
    } else if (cols == W && !X.index) {
      dequant_run(s.q + c0, s.scale, W, d);
    } else {
      for (int64_t jj = 0; jj < W; ++jj)
        d[jj] = jj < cols ? static_cast<float>(s.q[X.index ? X.index[c0 + jj] : c0 + jj]) * s.scale : 0.f;
    }
  }
}

// Ap[k*MR + ii] = op(A)(i0 + ii, p0 + k). Padding rows (ii >= rows) hold zeros or copies of a
// real row: only their values being finite matters, since the micro-kernel never stores them.
template <int MR>
void pack_a(const GemmOperand& A, int64_t i0, int64_t rows, int64_t p0, int64_t kc, float* dst) {
  if (A.q) {
    if (A.trans) return pack_cols_q<MR>(A, i0, rows, p0, kc, dst);
    int64_t src[MR];
    for (int64_t ii = 0; ii < MR; ++ii) {
      const int64_t i = i0 + std::min<int64_t>(ii, rows - 1);
      src[ii] = A.index ? A.index[i] : i;
    }
    return pack_rows_q<MR, MR>(A, src, p0, kc, dst);
  }
  if (!A.trans) {
    // Padding rows repeat the last real row: the micro-kernel never stores rows >= m, so their
    // values only need to be ordinary floats, and the fast transpose then serves edges too.
    const float* src[MR];
    for (int64_t ii = 0; ii < MR; ++ii) {
      const int64_t i = i0 + std::min<int64_t>(ii, rows - 1);
      src[ii] = A.data + (A.index ? A.index[i] : i) * A.ld + p0;
    }
    transpose_rows<MR, MR>(src, kc, dst);
  } else {
    for (int64_t k = 0; k < kc; ++k) {
      const float* s = A.data + (p0 + k) * A.ld;
      float* d = dst + k * MR;
      if (rows == MR && !A.index) {
        std::memcpy(d, s + i0, sizeof(float) * MR);
      } else if (rows == MR) {
        const int32_t* ix = A.index + i0;
        for (int ii = 0; ii < MR; ++ii) d[ii] = s[ix[ii]];
      } else if (!A.index) {
        std::memcpy(d, s + i0, sizeof(float) * rows);
        std::fill(d + rows, d + MR, 0.f);
      } else {
        for (int64_t ii = 0; ii < MR; ++ii) d[ii] = ii < rows ? s[A.index[i0 + ii]] : 0.f;
      }
    }
  }
}

// Bp[k*NR + jj] = op(B)(p0 + k, j0 + jj). Padding columns as for pack_a.
template <int NR>
void pack_b(const GemmOperand& B, int64_t j0, int64_t cols, int64_t p0, int64_t kc, float* dst) {
  if (B.q) {
    if (!B.trans) return pack_cols_q<NR>(B, j0, cols, p0, kc, dst);
    int64_t src[NR];
    for (int64_t jj = 0; jj < NR; ++jj) {
      const int64_t j = j0 + std::min<int64_t>(jj, cols - 1);
      src[jj] = B.index ? B.index[j] : j;
    }
    return pack_rows_q<NR, NR>(B, src, p0, kc, dst);
  }
  if (!B.trans) {
    for (int64_t k = 0; k < kc; ++k) {
      const float* s = B.data + (p0 + k) * B.ld;
      float* d = dst + k * NR;
      if (cols == NR && !B.index) {
        std::memcpy(d, s + j0, sizeof(float) * NR);
      } else if (cols == NR) {
        const int32_t* ix = B.index + j0;
        for (int jj = 0; jj < NR; ++jj) d[jj] = s[ix[jj]];
      } else if (!B.index) {  // the right edge (a conv's 196 columns = 6 x 32 + 4): a copy and a fill
        std::memcpy(d, s + j0, sizeof(float) * cols);
        std::fill(d + cols, d + NR, 0.f);
      } else {
        for (int64_t jj = 0; jj < NR; ++jj) d[jj] = jj < cols ? s[B.index[j0 + jj]] : 0.f;
      }
    }
  } else {
    const float* src[NR];  // padding columns repeat the last real one (never stored)
    for (int64_t jj = 0; jj < NR; ++jj) {
      const int64_t j = j0 + std::min<int64_t>(jj, cols - 1);
      src[jj] = B.data + (B.index ? B.index[j] : j) * B.ld + p0;
    }
    transpose_rows<NR, NR>(src, kc, dst);
  }
}

void scale_c(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f)
      std::fill(c, c + N, 0.f);
    else if (beta != 1.f)
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
  }
}

// Blocking and packing-buffer sizes of one blocked call: sgemm and sgemm_scratch_bytes both
// read them from here, so the memory the cost model is told is the memory sgemm takes.
struct BlockedPlan {
  int64_t MC, NC, KC;
  bool direct_a, direct_b;
  size_t a_elems, b_elems;
};

BlockedPlan blocked_plan(int MR, int NR, int64_t M, int64_t N, int64_t K, const GemmOperand& A,
                         const GemmOperand& B) {
  BlockedPlan p;
  p.MC = kMC / MR * MR;
  p.NC = std::max<int64_t>(kNC / NR, 1) * NR;
  // Equal K blocks (e.g. 784 -> 3 x 262 rather than 256+256+256+16) so no block is all overhead.
  const int64_t n_kb = ceil_div(K, kKC);
  p.KC = ceil_div(K, n_kb);
  const int64_t mc_max = std::min(M, p.MC), nc_max = std::min(N, p.NC);
  p.direct_b = !B.trans && !B.index && !B.q && M <= kDirectMaxOther;  // int8 is never read in place
  p.direct_a = A.trans && !A.index && !A.q && N <= kDirectMaxOther;
  // An operand read in place needs a packed copy only of its one partial edge panel (slot 0).
  p.a_elems = static_cast<size_t>((p.direct_a ? 1 : ceil_div(mc_max, MR)) * MR * p.KC);
  p.b_elems = static_cast<size_t>((p.direct_b ? 1 : ceil_div(nc_max, NR)) * NR * p.KC);
  return p;
}

template <int MR, int NR>
void sgemm_blocked(MicroKernel ukernel, int64_t M, int64_t N, int64_t K, float alpha, const GemmOperand& A,
                   const GemmOperand& B, float beta, float* C, int64_t ldc) {
  const BlockedPlan plan = blocked_plan(MR, NR, M, N, K, A, B);
  const int64_t MC = plan.MC, NC = plan.NC, KC = plan.KC;
  const bool direct_a = plan.direct_a, direct_b = plan.direct_b;
  const int64_t task_rows = kTaskRowPanels * MR;
  const int64_t task_cols = std::max<int64_t>(kTaskColElems / NR, 1) * NR;
  Scratch<float> a_buf(plan.a_elems);
  Scratch<float> b_buf(plan.b_elems);
  float* Ap = a_buf.data();
  float* Bp = b_buf.data();

  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc);
    const int64_t nb_panels = ceil_div(nc, NR);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const float beta_k = pc == 0 ? beta : 1.f;  // later K blocks add onto the first
      for (int64_t ic = 0; ic < M; ic += MC) {
        const int64_t mc = std::min(MC, M - ic);
        const int64_t na_panels = ceil_div(mc, MR);
        // Packing: B once per (jc, pc), A per ic. Full panels whose source already is a
        // unit-stride panel (B plain, A transposed, no gather) are read in place when the other
        // operand is small, i.e. when a packed copy would be reused too few times to pay off.
        // Work estimate = elements moved, so small problems pack inline.
        const int64_t pack_b_tasks = ic == 0 ? nb_panels : 0;
        parallel_for(
            pack_b_tasks + na_panels,
            [&](int64_t t) {
              if (t < pack_b_tasks) {
                const int64_t cols = std::min<int64_t>(NR, nc - t * NR);
                if (!(direct_b && cols == NR)) pack_b<NR>(B, jc + t * NR, cols, pc, kc, Bp + (direct_b ? 0 : t) * NR * kc);
              } else {
                const int64_t p = t - pack_b_tasks, rows = std::min<int64_t>(MR, mc - p * MR);
                if (!(direct_a && rows == MR)) pack_a<MR>(A, ic + p * MR, rows, pc, kc, Ap + (direct_a ? 0 : p) * MR * kc);
              }
            },
            double(pack_b_tasks * NR + na_panels * MR) * double(kc));

        const int64_t tr = ceil_div(mc, task_rows), tc = ceil_div(nc, task_cols);
        parallel_for(
            tr * tc,
            [&](int64_t t) {
              const int64_t r0 = (t / tc) * task_rows, c0 = (t % tc) * task_cols;
              const int64_t r1 = std::min(mc, r0 + task_rows), c1 = std::min(nc, c0 + task_cols);
              for (int64_t j = c0; j < c1; j += NR) {
                const int cols = static_cast<int>(std::min<int64_t>(NR, c1 - j));
                const bool bd = direct_b && cols == NR;
                const float* bp = bd ? B.data + pc * B.ld + jc + j : Bp + (direct_b ? 0 : j / NR) * NR * kc;
                const int64_t bs = bd ? B.ld : NR;
                for (int64_t i = r0; i < r1; i += MR) {
                  const int rows = static_cast<int>(std::min<int64_t>(MR, r1 - i));
                  const bool ad = direct_a && rows == MR;
                  const float* ap = ad ? A.data + pc * A.ld + ic + i : Ap + (direct_a ? 0 : i / MR) * MR * kc;
                  const int64_t as = ad ? A.ld : MR;
                  ukernel(kc, ap, as, bp, bs, C + (ic + i) * ldc + (jc + j), ldc, alpha, beta_k, rows, cols);
                }
              }
            },
            region_work(2.0 * double(mc) * double(nc) * double(kc)));
      }
    }
  }
}

// C = A B^T by dot products (no packing): for the small-batch dense forward the packed path
// spends much of its time transposing W into panels that are used only a few times.
// An int8 or mixed B (the forward of an int8 / partly trained int8 layer) is read kDotQChunk
// entries of K at a time: its block's rows' chunk is dequantised into a stack tile (4 or 8 x 1024
// floats; a mixed B's float rows are read in place), later chunks adding onto C, so nothing
// goes to counted workspace and W is dequantised once per call, not per row block of x (a
// 256-entry chunk and 24-row tasks made the int8 forward ~1.6x the float one at 32x784x128).
// A float B is one chunk of all of K, its rows read in place -- except for a block that wants
// B's rows on 64-byte boundaries (AVX-512: each zmm load of a misaligned row crosses a cache
// line, and NumPy aligns arrays to 16 bytes only; measured 75 against 136 GFLOP/s at
// 32x256x256). Such a
// block's misaligned B rows are copied chunk by chunk into the same (aligned) stack tile, once
// per task and block of B rows, and reused by all of the task's rows of A; a float B's task
// copies its misaligned rows of A as well (dot_a_tile).
constexpr int64_t kDotQChunk = 1024;  // K entries per chunk (16 or 32 KiB of stack tile)
typedef void (*DotBlock)(int64_t, const float* const*, const float* const*, float*, int64_t, float, float, int, int);

inline bool rows_aligned64(const GemmOperand& B, const int64_t* src, int n) {
  for (int jj = 0; jj < n; ++jj)
    if (reinterpret_cast<uintptr_t>(B.data + src[jj] * B.ld) % 64 != 0) return false;
  return true;
}

typedef void (*CopyFloats)(const float*, int64_t, float*);
inline void copy_floats(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, sizeof(float) * n); }

// The AVX-512 dot path's copy of a task's rows of A (8 * kDotMR rows of a K chunk: 96 KiB), on
// the heap once per thread that runs it: too large for a stack frame everywhere (musl gives a
// thread 128 KiB). Null if the allocation fails: the rows are then read in place.
inline float* dot_a_tile() {
  struct Tile {
    float* p = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * 8 * kDotMR * kDotQChunk));
    ~Tile() { std::free(p); }
  };
  static thread_local Tile tile;
  return tile.p;
}

// align_b: copy_b moves B rows that are not on 64-byte boundaries into the tile (see above).
template <DotBlock block, int DMR, int DNR, bool align_b, CopyFloats copy_b = copy_floats>
void sgemm_dot(int64_t M, int64_t N, int64_t K, float alpha, const GemmOperand& A, const GemmOperand& B,
               float beta, float* C, int64_t ldc) {
  constexpr int64_t kTaskCols = 64;
  // An int8 B's rows are dequantised once per task: its tasks take all of A's rows (M <= 64
  // here), so no row of B is converted twice.
  const int64_t task_rows = B.q ? M : 8 * DMR;
  const int64_t tr = ceil_div(M, task_rows), tc = ceil_div(N, kTaskCols);
  parallel_for(
      tr * tc,
      [&](int64_t t) {
        const int64_t r0 = (t / tc) * task_rows, c0 = (t % tc) * kTaskCols;
        const int64_t r1 = std::min(M, r0 + task_rows), c1 = std::min(N, c0 + kTaskCols);
        alignas(64) float tile[DNR * kDotQChunk];  // int8 / mixed B, or misaligned B for align_b
        // align_b with a float B: the task's rows of A too, when they are misaligned (each is
        // read once per block of B rows: 8 times in a 64-column task).
        float* const a_tile = align_b && !B.q ? dot_a_tile() : nullptr;
        // align_b chunks K whether it copies or not, so results never depend on addresses.
        const int64_t chunk = B.q || align_b ? std::min(K, kDotQChunk) : K;
        // Rows of kc floats, each starting on a 64-byte boundary of the tile.
        const int64_t pitch = (chunk + 15) / 16 * 16;
        auto a_row = [&](int64_t r) { return A.data + (A.index ? A.index[r] : r) * A.ld; };
        bool copy_a = false;
        if (a_tile)
          for (int64_t r = r0; r < r1 && !copy_a; ++r) copy_a = reinterpret_cast<uintptr_t>(a_row(r)) % 64 != 0;
        // Chunks of K outermost, so a copied chunk of A serves every block of B; each C element
        // still adds its chunks in order, as a loop over B blocks first would.
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t kc = std::min(chunk, K - k0);
          if (copy_a)
            for (int64_t r = r0; r < r1; ++r) copy_b(a_row(r) + k0, kc, a_tile + (r - r0) * pitch);
          const float beta_k = k0 == 0 ? beta : 1.f;
          for (int64_t j = c0; j < c1; j += DNR) {
            const int n = static_cast<int>(std::min<int64_t>(DNR, c1 - j));
            int64_t src[DNR];
            for (int jj = 0; jj < DNR; ++jj) {
              const int64_t c = j + std::min(jj, n - 1);  // padding repeats a real row, never stored
              src[jj] = B.index ? B.index[c] : c;
            }
            const bool copy = B.q || (align_b && !rows_aligned64(B, src, DNR));
            const float* b[DNR];
            for (int jj = 0; jj < DNR; ++jj) {
              if (B.q) {
                b[jj] = row_run(B, src[jj], k0, kc, tile + jj * pitch);
              } else if (copy) {
                copy_b(B.data + src[jj] * B.ld + k0, kc, tile + jj * pitch);
                b[jj] = tile + jj * pitch;
              } else {
                b[jj] = B.data + src[jj] * B.ld + k0;
              }
            }
            for (int64_t i = r0; i < r1; i += DMR) {
              const int m = static_cast<int>(std::min<int64_t>(DMR, r1 - i));
              const float* a[DMR];
              for (int ii = 0; ii < DMR; ++ii) {
                const int64_t r = i + std::min(ii, m - 1);
                a[ii] = copy_a ? a_tile + (r - r0) * pitch : a_row(r) + k0;
              }
              block(kc, a, b, C + i * ldc + j, ldc, alpha, beta_k, m, n);
            }
          }
        }
      },
      region_work(2.0 * double(M) * double(N) * double(K)));
}

}  // namespace
}  // namespace gemm_detail

void sgemm(int64_t M, int64_t N, int64_t K, float alpha, const GemmOperand& A, const GemmOperand& B, float beta,
           float* C, int64_t ldc) {
  using namespace gemm_detail;
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || alpha == 0.f) {
    scale_c(M, N, beta, C, ldc);
    return;
  }
  const KernelInfo& kern = kernel();
  if (use_dot_path(M, K, A, B)) {
#if defined(FTTE_HAVE_AVX2_KERNEL) && FTTE_HAVE_AVX2_KERNEL
    if (std::strcmp(kern.name, "avx512") == 0) {
      sgemm_dot<dot_block_avx512, kDotMR, kDot512NR, true, copy_floats_avx512>(M, N, K, alpha, A, B, beta, C, ldc);
      return;
    }
    if (std::strcmp(kern.name, "avx2-fma") == 0) {
      sgemm_dot<dot_block_avx2, kDotMR, kDotNR, false>(M, N, K, alpha, A, B, beta, C, ldc);
      return;
    }
#endif
    sgemm_dot<dot_block_generic, kDotMR, kDotNR, false>(M, N, K, alpha, A, B, beta, C, ldc);
    return;
  }
  // Panel shapes are compile-time in the packers so their copies unroll and vectorise.
  if (kern.mr == kGenMR && kern.nr == 4 * kGenNV)
    sgemm_blocked<kGenMR, 4 * kGenNV>(kern.fn, M, N, K, alpha, A, B, beta, C, ldc);
#if defined(FTTE_HAVE_AVX2_KERNEL) && FTTE_HAVE_AVX2_KERNEL
  else if (kern.mr == 6 && kern.nr == 16)
    sgemm_blocked<6, 16>(kern.fn, M, N, K, alpha, A, B, beta, C, ldc);
  else if (kern.mr == 8 && kern.nr == 32)
    sgemm_blocked<8, 32>(kern.fn, M, N, K, alpha, A, B, beta, C, ldc);
#endif
}

const char* sgemm_kernel_name() { return gemm_detail::kernel().name; }

size_t sgemm_scratch_bytes(int64_t M, int64_t N, int64_t K, const GemmOperand& A, const GemmOperand& B) {
  using namespace gemm_detail;
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  const KernelInfo& kern = kernel();
  if (use_dot_path(M, K, A, B)) return 0;
  const BlockedPlan plan = blocked_plan(kern.mr, kern.nr, M, N, K, A, B);
  return (plan.a_elems + plan.b_elems) * sizeof(float);
}

}  // namespace ftte

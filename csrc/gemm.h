// Single-precision GEMM, row-major, with optional row/column gathers, used by every dense and
// convolution kernel:   C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C
//
// An operand is a row-major source matrix with leading dimension `ld`:
//   A, trans=false: op(A)(i,k) = a[i*ld + k]       A, trans=true: op(A)(i,k) = a[k*ld + i]
//   B, trans=false: op(B)(k,j) = b[k*ld + j]       B, trans=true: op(B)(k,j) = b[j*ld + k]
// `index` (optional) renames op(A)'s rows / op(B)'s columns: row i of op(A) reads source
// row-or-column index[i] wherever the formula above says i (likewise j for B). That is how a
// backward pass reads only the selected output rows without copying them first.
//
// An int8 operand (`q` set, `data` unused): element (r, c) of the source matrix is
// q[r*ld + c] * q_scale[r] -- a weight stored as int8 with a float32 scale per source row (per
// output unit). It is dequantised while being packed into panels, never copied whole; such an
// operand is never read in place; as B of the dot path its rows are dequantised a K chunk at a
// time into a stack tile (no counted scratch), else its scratch is the packing panels
// (sgemm_scratch_bytes with the same operand says how much).
//
// A mixed operand (`q` and `row_slot` set): the weight of a partly trained layer, its frozen
// source rows int8 and its trained ones float32. row_slot[s] >= 0: source row s is row
// row_slot[s] of the compact float array `data` ([trained rows, ld]); row_slot[s] < 0: it is row
// ~row_slot[s] of the compact int8 array `q` (scale q_scale[~row_slot[s]]). It packs exactly as
// an int8 operand (same paths, same scratch): only where a row's values come from differs.
//
// Work is split over tiles of C only (never over K), so results are identical for any thread
// count. beta == 0 ignores C's old contents (NaN in C does not propagate).
#pragma once
#include <cstddef>
#include <cstdint>

namespace ftte {

struct GemmOperand {
  const float* data;
  int64_t ld;
  bool trans = false;
  const int32_t* index = nullptr;
  const int8_t* q = nullptr;        // int8 source instead of `data` (see above)
  const float* q_scale = nullptr;  // one scale per source row, with q
  const int32_t* row_slot = nullptr;  // mixed operand (see above)
};

// A layer's weight matrix [rows, row_len] as the kernels take it: float32; or int8 with one
// float32 scale per row (symmetric: value = q * scale); or mixed (`row_slot` set: a partly
// trained layer): frozen rows int8 in the compact q/scale arrays, trained rows float32 in the
// compact array `f`, row_slot[r] naming each row's slot (>= 0: f row, < 0: q row ~slot; see
// GemmOperand). A float pointer converts implicitly.
struct WeightView {
  const float* f = nullptr;
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  const int32_t* row_slot = nullptr;
  WeightView() = default;
  WeightView(const float* p) : f(p) {}  // NOLINT: implicit on purpose, float callers stay as they are
  WeightView(const int8_t* qp, const float* s) : q(qp), scale(s) {}
  WeightView(const int8_t* qp, const float* s, const float* trained, const int32_t* slot)
      : f(trained), q(qp), scale(s), row_slot(slot) {}
  bool quantized() const { return q != nullptr; }  // int8 or mixed: packed, never read in place
  bool mixed() const { return row_slot != nullptr; }
  bool empty() const { return !f && !q; }
  // Rows [first, ...) of a matrix whose rows hold row_len elements.
  WeightView from_row(int64_t first, int64_t row_len) const {
    if (mixed()) return WeightView(q, scale, f, row_slot + first);  // slots name compact rows: only the table moves
    return quantized() ? WeightView(q + first * row_len, scale + first) : WeightView(f ? f + first * row_len : f);
  }
  // The operand reading this matrix with leading dimension ld (= row_len).
  GemmOperand operand(int64_t ld, bool trans = false) const {
    return GemmOperand{f, ld, trans, nullptr, q, scale, row_slot};
  }
};

void sgemm(int64_t M, int64_t N, int64_t K, float alpha, const GemmOperand& A, const GemmOperand& B, float beta,
           float* C, int64_t ldc);

// Bytes of packing scratch sgemm would take for this call (0 when it reads operands in place).
size_t sgemm_scratch_bytes(int64_t M, int64_t N, int64_t K, const GemmOperand& A, const GemmOperand& B);

// Which micro-kernel sgemm uses on this CPU ("avx512", "avx2-fma", "generic").
const char* sgemm_kernel_name();

}  // namespace ftte

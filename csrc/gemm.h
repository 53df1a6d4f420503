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
};

void sgemm(int64_t M, int64_t N, int64_t K, float alpha, const GemmOperand& A, const GemmOperand& B, float beta,
           float* C, int64_t ldc);

// Bytes of packing scratch sgemm would take for this call (0 when it reads operands in place).
size_t sgemm_scratch_bytes(int64_t M, int64_t N, int64_t K, const GemmOperand& A, const GemmOperand& B);

// Which micro-kernel sgemm uses on this CPU ("avx2-fma", "generic").
const char* sgemm_kernel_name();

}  // namespace ftte

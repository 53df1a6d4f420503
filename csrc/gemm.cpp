// Straightforward reference implementation; to be replaced by the packed, blocked version.
#include "gemm.h"

#include "parallel.h"

namespace ftte {

static inline float a_at(const GemmOperand& A, int64_t i, int64_t k) {
  int64_t r = A.index ? A.index[i] : i;
  return A.trans ? A.data[k * A.ld + r] : A.data[r * A.ld + k];
}
static inline float b_at(const GemmOperand& B, int64_t k, int64_t j) {
  int64_t c = B.index ? B.index[j] : j;
  return B.trans ? B.data[c * B.ld + k] : B.data[k * B.ld + c];
}

void sgemm(int64_t M, int64_t N, int64_t K, float alpha, const GemmOperand& A, const GemmOperand& B, float beta,
           float* C, int64_t ldc) {
  parallel_for(
      M,
      [&](int64_t i) {
        for (int64_t j = 0; j < N; ++j) {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += a_at(A, i, k) * b_at(B, k, j);
          float* c = &C[i * ldc + j];
          *c = beta == 0.f ? alpha * acc : alpha * acc + beta * *c;
        }
      },
      2.0 * M * N * K);
}

const char* sgemm_kernel_name() { return "reference"; }

}  // namespace ftte

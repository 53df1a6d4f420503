// Fused weighted merge of K updates into the selected rows of a parameter tensor [O, F]:
//   target[rows[r]] += sum_k alphas[k] * scales[k][r] * q[k][r]      (int8 / packed int4)
//   target[rows[r]] += sum_k alphas[k] * deltas[k][r]                (float baseline)
// Each update is read once and each target row written once; the sum over k runs in fixed k
// order inside a row, so the result is bit-identical for any thread count.
// Pure C++ (no pybind11). rows == nullptr means all rows (R == O); rows must be unique.
#pragma once
#include <cstdint>

namespace ftte {

void merge_int8(float* target, int64_t F, const int32_t* rows, int64_t R, int64_t K, const int8_t* const* qs,
                const float* const* scales, const float* alphas);
void merge_int4(float* target, int64_t F, const int32_t* rows, int64_t R, int64_t K, const uint8_t* const* qs,
                const float* const* scales, const float* alphas);  // qs[k]: [R, (F+1)/2]
void merge_float(float* target, int64_t F, const int32_t* rows, int64_t R, int64_t K, const float* const* deltas,
                 const float* alphas);

}  // namespace ftte

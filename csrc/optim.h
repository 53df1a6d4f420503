// SGD (PyTorch semantics: weight decay added to the gradient, momentum without dampening or
// Nesterov) applied only to selected rows of a parameter.
#pragma once
#include <cstdint>

namespace ftte {

// param[O,F]; rows[R] (nullptr: identity, caller passes R == O), must be unique; grad[R,F]; velocity[R,F] or
// nullptr (only allowed when momentum == 0).
void sgd_update_rows(float* param, int64_t O, int64_t F, const int32_t* rows, int64_t R, const float* grad,
                     float* velocity, float lr, float momentum, float weight_decay);

// The hyper-parameters of one fused gradient-and-update pass (see dense_backward_sgd).
struct SgdStep {
  float lr, momentum, weight_decay;
};

// Weight-gradient tiles of the fused passes: a tile is a few whole gradient rows, never the
// layer's whole gradient. Rows per tile: as many rows of `row_elems` floats as fit `cap_bytes`,
// a multiple of kGradTileRowGranule (8: whole micro-kernel panels on aarch64) and never fewer
// than kGradTileMinRows (16: an 8-row tile wasted a third of the 6-row GEMM kernel's work on
// x86-64 and armv7; a row of more than cap/16 bytes takes 16 rows, over the cap). The rule is
// the same on every CPU, so the hub predicts a device's tiles. When R rows need several tiles
// they are cut into equal ones (rounded up to the granule), so the last is not a sliver.
// Returns R when they all fit one tile, 0 when R == 0.
constexpr int64_t kGradTileRowGranule = 8, kGradTileMinRows = 16;
int64_t grad_tile_rows(int64_t R, int64_t row_elems, int64_t cap_bytes);

}  // namespace ftte

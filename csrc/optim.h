// SGD (PyTorch semantics: weight decay added to the gradient, momentum without dampening or
// Nesterov) applied only to selected rows of a parameter.
#pragma once
#include <cstdint>

namespace ftte {

// param[O,F]; rows[R] (nullptr: identity, caller passes R == O), must be unique; grad[R,F]; velocity[R,F] or
// nullptr (only allowed when momentum == 0).
void sgd_update_rows(float* param, int64_t O, int64_t F, const int32_t* rows, int64_t R, const float* grad,
                     float* velocity, float lr, float momentum, float weight_decay);

}  // namespace ftte

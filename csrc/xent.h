// Softmax + cross-entropy over rows of logits[N, C] with int32 class labels (already checked
// to be in [0, C)). Pure C++: no Python here.
#pragma once
#include <cstdint>

namespace ftte {

// Fills probs = softmax(logits) row-wise (probs may be logits itself) and returns the mean
// over rows of -log probs[label].
double softmax_xent_forward(int64_t N, int64_t C, const float* logits, const int32_t* labels, float* probs);

// dlogits = (probs - onehot(labels)) * scale; dlogits may be probs itself.
void softmax_xent_backward(int64_t N, int64_t C, const float* probs, const int32_t* labels, float* dlogits,
                           float scale);

}  // namespace ftte

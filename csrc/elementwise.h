// Elementwise add/mul with numpy-style broadcasting of the second operand onto the first's
// shape, their backward (the second operand's gradient is reduced over the broadcast axes in a
// fixed order), and channel (axis 1) concatenation with its backward (a split).
#pragma once
#include <cstdint>
#include <vector>

namespace ftte {

// a's shape with b's broadcast onto it, adjacent axes of the same kind (b full / b broadcast)
// merged and size-1 axes dropped. Build with make_broadcast; shapes must already be valid.
struct Broadcast {
  std::vector<int64_t> dim, astride, bstride;  // bstride 0 on broadcast axes
  int64_t total = 0, bsize = 0;
};
Broadcast make_broadcast(const std::vector<int64_t>& ashape, const std::vector<int64_t>& bshape);

// y[i] = a[i] op b[bcast(i)]. y may be a (in place).
void add_forward(const Broadcast& g, const float* a, const float* b, float* y);
void mul_forward(const Broadcast& g, const float* a, const float* b, float* y);

// y = a + b: da = dy (may be nullptr or dy itself), db = dy summed over broadcast axes (may be nullptr).
// accumulate adds into da and db (where paths join in a DAG); da must then not be dy.
void add_backward(const Broadcast& g, const float* dy, float* da, float* db, bool accumulate);
// y = a * b: da = dy * b (may be nullptr or dy itself), db = (dy * a) summed over broadcast axes (may be nullptr).
void mul_backward(const Broadcast& g, const float* a, const float* b, const float* dy, float* da, float* db,
                  bool accumulate);

// xs[i] is [N, cs[i], S]; y is [N, sum cs, S].
void concat_forward(const std::vector<const float*>& xs, const std::vector<int64_t>& cs, float* y, int64_t N,
                    int64_t S);
// dxs[i] (nullptr: not wanted) gets (accumulate: adds) dy's channel slice i.
void concat_backward(const float* dy, const std::vector<float*>& dxs, const std::vector<int64_t>& cs, int64_t N,
                     int64_t S, bool accumulate);

}  // namespace ftte

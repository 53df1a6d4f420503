// Scratch memory that kernels allocate for themselves (im2col columns, GEMM packing panels).
// Every byte goes through a counter so the engine can report what a training step really
// used, next to what the cost model predicted.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ftte {

size_t workspace_current_bytes();
size_t workspace_peak_bytes();
void workspace_reset_peak();  // peak := current

void* workspace_alloc(size_t bytes);  // 64-byte aligned; throws std::bad_alloc
void workspace_free(void* p, size_t bytes);

// RAII array of T from the counted workspace. Contents are uninitialised.
template <class T>
class Scratch {
 public:
  explicit Scratch(size_t n) : n_(n), p_(n ? static_cast<T*>(workspace_alloc(n * sizeof(T))) : nullptr) {}
  ~Scratch() {
    if (p_) workspace_free(p_, n_ * sizeof(T));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  const T* data() const { return p_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return p_[i]; }

 private:
  size_t n_;
  T* p_;
};

}  // namespace ftte

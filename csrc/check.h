// Argument checks for the Python bindings: every array that reaches a kernel has been checked
// for dtype, C-contiguity, writability and shape here, so bad input raises ValueError with a
// message naming the function and argument, and never reaches C++ as a wild pointer.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include "gemm.h"

namespace ftte {
namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  if (a.ndim() == 1) s << ",";
  s << ")";
  return s.str();
}

template <class T>
inline const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<int8_t>() { return "int8"; }
template <> inline const char* dtype_name<uint8_t>() { return "uint8"; }
template <> inline const char* dtype_name<int32_t>() { return "int32"; }

[[noreturn]] inline void fail(const std::string& fn, const std::string& msg) {
  throw py::value_error(fn + ": " + msg);
}

// Checks `a` is a C-contiguous array of T with ndim == dims.size(); dims entries >= 0 must match
// exactly, -1 means any. Returns a pointer to its data.
template <class T>
T* checked(const std::string& fn, const char* name, const py::handle& obj, const std::vector<int64_t>& dims,
           bool writable = false) {
  if (!py::isinstance<py::array>(obj)) fail(fn, std::string(name) + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(fn, std::string(name) + " must have dtype " + dtype_name<T>() + ", got " + std::string(py::str(a.dtype())));
  if (a.ndim() != static_cast<py::ssize_t>(dims.size()))
    fail(fn, std::string(name) + " must have " + std::to_string(dims.size()) + " dimensions, got shape " +
                 shape_str(a));
  int i = 0;
  for (int64_t d : dims) {
    if (d >= 0 && a.shape(i) != d) {
      std::ostringstream s;
      s << name << " has shape " << shape_str(a) << " but dimension " << i << " must be " << d;
      fail(fn, s.str());
    }
    ++i;
  }
  if (!(a.flags() & py::array::c_style)) fail(fn, std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) fail(fn, std::string(name) + " must be writable");
  // armv7 faults (SIGBUS) on a float load from a misaligned address (VLDR, NEON with alignment),
  // e.g. np.frombuffer at an odd offset: refuse it here rather than crash on a Pi.
  if (reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) != 0)
    fail(fn, std::string(name) + " must be aligned to " + std::to_string(alignof(T)) +
                 " bytes (np.require(a, requirements='A') makes an aligned copy)");
  return static_cast<T*>(const_cast<void*>(a.data()));
}
template <class T>
T* checked(const std::string& fn, const char* name, const py::handle& obj, std::initializer_list<int64_t> dims,
           bool writable = false) {
  return checked<T>(fn, name, obj, std::vector<int64_t>(dims), writable);
}

// A Python integer (not a bool) as int64.
inline int64_t as_int(const std::string& fn, const char* name, const py::handle& h) {
  if (py::isinstance<py::bool_>(h) || !PyIndex_Check(h.ptr())) fail(fn, std::string(name) + " must hold integers");
  return py::reinterpret_steal<py::int_>(PyNumber_Index(h.ptr())).cast<int64_t>();
}

// An int (used for every axis) or a sequence of exactly n ints: strides, paddings, kernel sizes.
template <size_t n>
inline std::array<int64_t, n> int_tuple(const std::string& fn, const char* name, const py::handle& obj) {
  std::array<int64_t, n> out{};
  if (PyIndex_Check(obj.ptr()) && !py::isinstance<py::bool_>(obj)) {
    out.fill(as_int(fn, name, obj));
    return out;
  }
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
    fail(fn, std::string(name) + " must be an int or a sequence of " + std::to_string(n) + " ints");
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  if (seq.size() != n)
    fail(fn, std::string(name) + " must have " + std::to_string(n) + " entries, got " + std::to_string(seq.size()));
  for (size_t i = 0; i < n; ++i) out[i] = as_int(fn, name, seq[i]);
  return out;
}

inline int64_t dim(const py::handle& obj, int i) { return py::reinterpret_borrow<py::array>(obj).shape(i); }

// A layer weight `w` of shape `dims`: float32 (w_scale None), or int8 with w_scale float32
// [w.shape[0]], one scale per output row (value = q * scale).
inline WeightView checked_weight(const std::string& fn, const py::handle& w, const py::handle& w_scale,
                                 std::initializer_list<int64_t> dims) {
  if (py::isinstance<py::array>(w) && py::reinterpret_borrow<py::array>(w).dtype().is(py::dtype::of<int8_t>())) {
    const int8_t* q = checked<int8_t>(fn, "w", w, dims);
    if (w_scale.is_none()) fail(fn, "w is int8, so w_scale (float32, one per output row) is required");
    return WeightView(q, checked<float>(fn, "w_scale", w_scale, {dim(w, 0)}));
  }
  if (!w_scale.is_none()) {
    const std::string got = py::isinstance<py::array>(w)
                                ? std::string(py::str(py::reinterpret_borrow<py::array>(w).dtype()))
                                : std::string("not a numpy array");
    fail(fn, "w must have dtype int8 when w_scale is given, got " + got);
  }
  return WeightView(checked<float>(fn, "w", w, dims));
}

// A layer weight that may also be mixed (a partly trained layer, see WeightView): w_trained
// (float32 [R, ...]) and row_slot (int32 [O]) given together, with w the int8 frozen rows
// [Q, ...] and w_scale float32 [Q]; every slot must name a row of its array. Without them, as
// checked_weight. dims: the whole weight's shape (-1: any; dims[0] is the row count O). *rows
// gets O; trained_writable: w_trained is updated in place (the fused SGD).
inline WeightView checked_weight(const std::string& fn, const py::handle& w, const py::handle& w_scale,
                                 const py::handle& w_trained, const py::handle& row_slot,
                                 std::initializer_list<int64_t> dims, int64_t* rows, bool trained_writable = false) {
  if (w_trained.is_none() && row_slot.is_none()) {
    const WeightView v = checked_weight(fn, w, w_scale, dims);
    *rows = dim(w, 0);
    return v;
  }
  if (w_trained.is_none() || row_slot.is_none())
    fail(fn, "w_trained and row_slot must be given together (a mixed weight)");
  if (!py::isinstance<py::array>(w) || !py::reinterpret_borrow<py::array>(w).dtype().is(py::dtype::of<int8_t>()))
    fail(fn, "w must have dtype int8 (the frozen rows) when w_trained is given");
  if (w_scale.is_none()) fail(fn, "w is int8, so w_scale (float32, one per frozen row) is required");
  std::vector<int64_t> frozen(dims);
  frozen[0] = -1;
  const int8_t* q = checked<int8_t>(fn, "w", w, frozen);
  const int64_t Q = dim(w, 0);
  const int nd = static_cast<int>(py::reinterpret_borrow<py::array>(w).ndim());
  std::vector<int64_t> trained(static_cast<size_t>(nd), -1);
  for (int i = 1; i < nd; ++i) trained[static_cast<size_t>(i)] = dim(w, i);
  const float* f = checked<float>(fn, "w_trained", w_trained, trained, trained_writable);
  const int64_t R = dim(w_trained, 0);
  const int32_t* slot = checked<int32_t>(fn, "row_slot", row_slot, {*dims.begin()});
  const int64_t O = dim(row_slot, 0);
  if (Q + R != O)
    fail(fn, "w has " + std::to_string(Q) + " frozen and w_trained " + std::to_string(R) +
                 " trained rows, but row_slot has " + std::to_string(O));
  for (int64_t r = 0; r < O; ++r) {
    const int32_t s = slot[r];
    if (s >= 0 ? s >= R : ~s >= Q)
      fail(fn, "row_slot[" + std::to_string(r) + "] = " + std::to_string(s) + " names no row (" + std::to_string(R) +
                   " trained: 0 and up, " + std::to_string(Q) + " frozen: -1 and down)");
  }
  const float* scale = checked<float>(fn, "w_scale", w_scale, {Q});
  static const int8_t no_rows[1] = {0};  // every row trains: q is never read, but marks the weight packed
  *rows = O;
  return WeightView(Q ? q : no_rows, scale, f, slot);
}

// For an in-place update of a mixed weight's trained rows `rows` (all R of them, in order):
// row_slot[rows[r]] == r, so trained row rows[r] is compact row r.
inline void check_mixed_rows(const std::string& fn, const WeightView& w, const int32_t* rows, int64_t R,
                             const py::handle& w_trained) {
  if (!w.mixed()) return;
  if (!rows) fail(fn, "a mixed weight needs rows (its trained rows, in w_trained's order)");
  if (R != dim(w_trained, 0))
    fail(fn, "rows has " + std::to_string(R) + " entries, w_trained " + std::to_string(dim(w_trained, 0)) + " rows");
  for (int64_t r = 0; r < R; ++r)
    if (w.row_slot[rows[r]] != r)
      fail(fn, "row_slot[rows[" + std::to_string(r) + "]] must be " + std::to_string(r) + " (w_trained follows rows)");
}

// Where a checked weight's values start and how many bytes they span (for overlap checks).
inline const void* weight_data(const WeightView& w) {
  return w.quantized() ? static_cast<const void*>(w.q) : static_cast<const void*>(w.f);
}
inline int64_t weight_elem_bytes(const WeightView& w) { return w.quantized() ? 1 : 4; }

// Output rows selection: None means all `n` rows. Checks range and uniqueness is the caller's
// business only where it matters (gradients written to distinct slots need no uniqueness).
inline std::vector<int32_t> rows_or_all(const std::string& fn, const py::handle& rows, int64_t n) {
  std::vector<int32_t> out;
  if (rows.is_none()) {
    out.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    return out;
  }
  const int32_t* r = checked<int32_t>(fn, "rows", rows, {-1});
  int64_t len = dim(rows, 0);
  out.assign(r, r + len);
  for (int32_t v : out)
    if (v < 0 || v >= n) fail(fn, "rows holds " + std::to_string(v) + ", outside [0, " + std::to_string(n) + ")");
  return out;
}

// rows_or_all for an in-place update: also unique (a repeated row would be updated twice from one
// gradient).
inline std::vector<int32_t> unique_rows_or_all(const std::string& fn, const py::handle& rows, int64_t n) {
  std::vector<int32_t> out = rows_or_all(fn, rows, n);
  if (!rows.is_none()) {
    std::vector<char> seen(static_cast<size_t>(n), 0);
    for (int32_t v : out) {
      if (seen[static_cast<size_t>(v)]) fail(fn, "rows holds " + std::to_string(v) + " more than once");
      seen[static_cast<size_t>(v)] = 1;
    }
  }
  return out;
}

}  // namespace ftte

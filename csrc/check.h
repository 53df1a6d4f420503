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
T* checked(const std::string& fn, const char* name, const py::handle& obj, std::initializer_list<int64_t> dims,
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

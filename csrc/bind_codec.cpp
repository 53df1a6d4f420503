// Python bindings for the delta codec and the fused merge. Every argument is validated here with
// the GIL held (ValueError naming function and argument); the kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>
#include <vector>

#include "check.h"
#include "codec.h"
#include "merge.h"

namespace py = pybind11;
using ftte::checked;
using ftte::dim;
using ftte::fail;

namespace {

// rows: None (all O rows, returns R = O and a null pointer) or int32 [R] in [0, O).
const int32_t* rows_arg(const std::string& fn, const py::object& rows, int64_t O, int64_t* R, bool unique) {
  if (rows.is_none()) {
    *R = O;
    return nullptr;
  }
  const int32_t* r = checked<int32_t>(fn, "rows", rows, {-1});
  *R = dim(rows, 0);
  std::vector<char> seen(unique ? static_cast<size_t>(O) : 0, 0);
  for (int64_t i = 0; i < *R; ++i) {
    int32_t v = r[i];
    if (v < 0 || v >= O) fail(fn, "rows[" + std::to_string(i) + "] = " + std::to_string(v) + " is outside [0, " + std::to_string(O) + ")");
    if (unique) {
      if (seen[static_cast<size_t>(v)]) fail(fn, "rows holds " + std::to_string(v) + " twice; merge rows must be unique");
      seen[static_cast<size_t>(v)] = 1;
    }
  }
  return r;
}

// Any integer (Python or NumPy) is a seed; it is taken modulo 2^64 so negative seeds (e.g. from
// hash()) work. Non-integers (floats, None) raise ValueError.
uint64_t seed_arg(const char* fn, const py::object& seed) {
  PyObject* idx = PyNumber_Index(seed.ptr());
  if (!idx) {
    PyErr_Clear();
    fail(fn, "seed must be an integer, got " + std::string(py::str(py::type::of(seed).attr("__name__"))));
  }
  uint64_t s = PyLong_AsUnsignedLongLongMask(idx);
  Py_DECREF(idx);
  if (PyErr_Occurred()) throw py::error_already_set();
  return s;
}

void check_finite(const std::string& fn, const std::string& name, const float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) fail(fn, name + "[" + std::to_string(i) + "] is not finite");
}

template <bool INT4>
void encode(const char* fn, const py::object& newp, const py::object& base, const py::object& rows, const py::object& q,
            const py::object& scales, bool stochastic, uint64_t seed) {
  const float* n = checked<float>(fn, "new", newp, {-1, -1});
  const int64_t O = dim(newp, 0), F = dim(newp, 1);
  int64_t R;
  const int32_t* r = rows_arg(fn, rows, O, &R, false);
  const float* b = checked<float>(fn, "base", base, {R, F});
  float* s = checked<float>(fn, "scales", scales, {R}, true);
  void* qp;
  if (INT4)
    qp = checked<uint8_t>(fn, "q", q, {R, (F + 1) / 2}, true);
  else
    qp = checked<int8_t>(fn, "q", q, {R, F}, true);
  int64_t bad;
  {
    py::gil_scoped_release nogil;
    bad = INT4 ? ftte::encode_int4(n, b, r, R, F, static_cast<uint8_t*>(qp), s, stochastic, seed)
               : ftte::encode_int8(n, b, r, R, F, static_cast<int8_t*>(qp), s, stochastic, seed);
  }
  if (bad >= 0)
    fail(fn, "delta row " + std::to_string(bad) + " (new row " + std::to_string(r ? r[bad] : bad) +
                 ") holds NaN or Inf; q and scales are not valid");
}

template <bool INT4>
void decode(const char* fn, const py::object& q, const py::object& scales, const py::object& out) {
  float* o = checked<float>(fn, "out", out, {-1, -1}, true);
  const int64_t R = dim(out, 0), F = dim(out, 1);
  const float* s = checked<float>(fn, "scales", scales, {R});
  check_finite(fn, "scales", s, R);
  if (INT4) {
    const uint8_t* qp = checked<uint8_t>(fn, "q", q, {R, (F + 1) / 2});
    py::gil_scoped_release nogil;
    ftte::decode_int4(qp, s, R, F, o);
  } else {
    const int8_t* qp = checked<int8_t>(fn, "q", q, {R, F});
    py::gil_scoped_release nogil;
    ftte::decode_int8(qp, s, R, F, o);
  }
}

py::list as_list(const std::string& fn, const char* name, const py::object& obj) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    fail(fn, std::string(name) + " must be a list or tuple of numpy arrays");
  return py::list(obj);
}

// kind: 0 = int8, 1 = packed int4, 2 = float32 deltas (no scales).
template <int KIND>
void merge(const char* fn, const py::object& target, const py::object& rows, const py::object& qs_obj,
           const py::object& scales_obj, const py::object& alphas_obj) {
  float* t = checked<float>(fn, "target", target, {-1, -1}, true);
  const int64_t O = dim(target, 0), F = dim(target, 1);
  int64_t R;
  const int32_t* r = rows_arg(fn, rows, O, &R, true);
  const char* qname = KIND == 2 ? "deltas" : "qs";
  py::list qs = as_list(fn, qname, qs_obj);  // holds references while the GIL is released
  const int64_t K = static_cast<int64_t>(qs.size());
  const float* a = checked<float>(fn, "alphas", alphas_obj, {-1});
  if (dim(alphas_obj, 0) != K)
    fail(fn, "alphas has " + std::to_string(dim(alphas_obj, 0)) + " entries but " + qname + " has " + std::to_string(K));
  check_finite(fn, "alphas", a, K);
  std::vector<const void*> qp(static_cast<size_t>(K));
  std::vector<const float*> sp(static_cast<size_t>(K));
  py::list scales;
  if (KIND != 2) {
    scales = as_list(fn, "scales", scales_obj);
    if (static_cast<int64_t>(scales.size()) != K)
      fail(fn, "scales has " + std::to_string(scales.size()) + " arrays but qs has " + std::to_string(K));
  }
  for (int64_t k = 0; k < K; ++k) {
    const std::string qk = std::string(qname) + "[" + std::to_string(k) + "]";
    py::object qo = qs[static_cast<size_t>(k)];
    if (KIND == 0) qp[k] = checked<int8_t>(fn, qk.c_str(), qo, {R, F});
    if (KIND == 1) qp[k] = checked<uint8_t>(fn, qk.c_str(), qo, {R, (F + 1) / 2});
    if (KIND == 2) qp[k] = checked<float>(fn, qk.c_str(), qo, {R, F});
    if (KIND != 2) {
      const std::string sk = "scales[" + std::to_string(k) + "]";
      sp[k] = checked<float>(fn, sk.c_str(), scales[static_cast<size_t>(k)], {R});
      check_finite(fn, sk, sp[k], R);
    }
  }
  py::gil_scoped_release nogil;
  if (KIND == 0)
    ftte::merge_int8(t, F, r, R, K, reinterpret_cast<const int8_t* const*>(qp.data()), sp.data(), a);
  if (KIND == 1)
    ftte::merge_int4(t, F, r, R, K, reinterpret_cast<const uint8_t* const*>(qp.data()), sp.data(), a);
  if (KIND == 2) ftte::merge_float(t, F, r, R, K, reinterpret_cast<const float* const*>(qp.data()), a);
}

}  // namespace

void register_codec(py::module_& m) {
  m.def(
      "encode_int8",
      [](py::object newp, py::object base, py::object rows, py::object q, py::object scales, bool stochastic,
         py::object seed) { encode<false>("encode_int8", newp, base, rows, q, scales, stochastic, seed_arg("encode_int8", seed)); },
      py::arg("new"), py::arg("base"), py::arg("rows"), py::arg("q"), py::arg("scales"), py::arg("stochastic") = false,
      py::arg("seed") = 0,
      "delta = new[rows] - base quantized to int8 q [R,F] with scales [R] = max|delta|/127 per row. "
      "Nearest rounds half away from zero; stochastic is unbiased and reproducible from (seed, r, c) "
      "(seed: any integer, taken mod 2**64; r: position in rows). "
      "rows: int32 [R] or None (all rows). ValueError names the first row holding NaN/Inf.");
  m.def(
      "decode_int8", [](py::object q, py::object scales, py::object out) { decode<false>("decode_int8", q, scales, out); },
      py::arg("q"), py::arg("scales"), py::arg("out"), "out [R,F] = q * scales[:, None].");
  m.def(
      "encode_int4",
      [](py::object newp, py::object base, py::object rows, py::object q, py::object scales, bool stochastic,
         py::object seed) { encode<true>("encode_int4", newp, base, rows, q, scales, stochastic, seed_arg("encode_int4", seed)); },
      py::arg("new"), py::arg("base"), py::arg("rows"), py::arg("q"), py::arg("scales"), py::arg("stochastic") = false,
      py::arg("seed") = 0,
      "Like encode_int8 with levels [-7, 7] (scale = max/7), packed into q uint8 [R, (F+1)//2]: element 2i "
      "in the low nibble, 2i+1 in the high nibble, two's complement; odd F leaves the last high nibble 0.");
  m.def(
      "decode_int4", [](py::object q, py::object scales, py::object out) { decode<true>("decode_int4", q, scales, out); },
      py::arg("q"), py::arg("scales"), py::arg("out"), "out [R,F] = unpack(q) * scales[:, None]; F is taken from out.");
  m.def(
      "merge_int8",
      [](py::object target, py::object rows, py::object qs, py::object scales, py::object alphas) {
        merge<0>("merge_int8", target, rows, qs, scales, alphas);
      },
      py::arg("target"), py::arg("rows"), py::arg("qs"), py::arg("scales"), py::arg("alphas"),
      "target[rows[r]] += sum_k alphas[k] * scales[k][r] * qs[k][r] in one fused pass. qs: K int8 [R,F], "
      "scales: K float32 [R], alphas: float32 [K]; rows unique int32 [R] or None.");
  m.def(
      "merge_int4",
      [](py::object target, py::object rows, py::object qs, py::object scales, py::object alphas) {
        merge<1>("merge_int4", target, rows, qs, scales, alphas);
      },
      py::arg("target"), py::arg("rows"), py::arg("qs"), py::arg("scales"), py::arg("alphas"),
      "As merge_int8 with packed int4 qs uint8 [R, (F+1)//2].");
  m.def(
      "merge_float",
      [](py::object target, py::object rows, py::object deltas, py::object alphas) {
        merge<2>("merge_float", target, rows, deltas, py::none(), alphas);
      },
      py::arg("target"), py::arg("rows"), py::arg("deltas"), py::arg("alphas"),
      "target[rows[r]] += sum_k alphas[k] * deltas[k][r]; deltas: K float32 [R,F].");
  m.def(
      "codec_random_bits", [](py::object seed, int64_t r, int64_t c) { return ftte::codec_random_bits(seed_arg("codec_random_bits", seed), r, c); },
      py::arg("seed"), py::arg("r"), py::arg("c"),
      "The 32 random bits stochastic rounding uses for (seed, r, c); u = (bits >> 8) / 2**24.");
}

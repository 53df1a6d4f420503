// Python bindings for the graph-op kernels: frozen batch norm, broadcast add/mul, channel concat.
// Every argument is checked here with the GIL held; the kernels then run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "elementwise.h"
#include "normalize.h"

namespace py = pybind11;
using ftte::checked;
using ftte::fail;

namespace {

// Any-shape float32 array, C-contiguous, aligned (armv7 faults otherwise), writable if asked.
struct Arr {
  float* data = nullptr;
  std::vector<int64_t> shape;
  int64_t size = 0;
  int64_t bytes() const { return size * 4; }
};

Arr arr(const std::string& fn, const char* name, const py::handle& obj, bool writable = false) {
  if (!py::isinstance<py::array>(obj)) fail(fn, std::string(name) + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<float>()))
    fail(fn, std::string(name) + " must have dtype float32, got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) fail(fn, std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) fail(fn, std::string(name) + " must be writable");
  if (reinterpret_cast<uintptr_t>(a.data()) % alignof(float) != 0)
    fail(fn, std::string(name) + " must be aligned to 4 bytes (np.require(a, requirements='A') makes an aligned copy)");
  Arr r;
  r.data = static_cast<float*>(const_cast<void*>(a.data()));
  r.size = static_cast<int64_t>(a.size());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) r.shape.push_back(a.shape(i));
  return r;
}

std::string shape_of(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

void same_shape(const std::string& fn, const char* an, const Arr& a, const char* bn, const Arr& b) {
  if (a.shape != b.shape)
    fail(fn, std::string(bn) + " has shape " + shape_of(b.shape) + " but must match " + an + "'s " + shape_of(a.shape));
}

bool overlap(const void* a, int64_t abytes, const void* b, int64_t bbytes) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return abytes > 0 && bbytes > 0 && pa < pb + static_cast<uintptr_t>(bbytes) && pb < pa + static_cast<uintptr_t>(abytes);
}

// An output may be its same-shape elementwise input (in place) or disjoint from it, never shifted.
void same_or_disjoint(const std::string& fn, const char* on, const Arr& o, const char* in, const Arr& i) {
  if (o.data == i.data && o.size == i.size) return;
  if (overlap(o.data, o.bytes(), i.data, i.bytes()))
    fail(fn, std::string(on) + " and " + in + " overlap without being the same array");
}

void disjoint(const std::string& fn, const char* on, const Arr& o, const char* in, const Arr& i) {
  if (overlap(o.data, o.bytes(), i.data, i.bytes())) fail(fn, std::string(on) + " must not share memory with " + in);
}

// x is [N, C, ...] (at least 2 dims). Returns (N, C, S).
std::array<int64_t, 3> nchw(const std::string& fn, const char* name, const Arr& x) {
  if (x.shape.size() < 2)
    fail(fn, std::string(name) + " must have at least 2 dimensions [N, C, ...], got shape " + shape_of(x.shape));
  int64_t S = 1;
  for (size_t i = 2; i < x.shape.size(); ++i) S *= x.shape[i];
  return {x.shape[0], x.shape[1], S};
}

float check_eps(const std::string& fn, float eps) {
  if (!(eps >= 0.f)) fail(fn, "eps must be >= 0, got " + std::to_string(eps));
  return eps;
}

void check_var(const std::string& fn, const float* var, int64_t C, float eps) {
  for (int64_t c = 0; c < C; ++c)
    if (!(var[c] + eps > 0.f))
      fail(fn, "var[" + std::to_string(c) + "] + eps must be > 0, got " + std::to_string(var[c] + eps));
}

void py_bn_forward(py::handle x, py::handle scale, py::handle shift, py::handle mean, py::handle var, float eps,
                   py::handle y) {
  const std::string fn = "batchnorm_forward";
  Arr xa = arr(fn, "x", x);
  auto d = nchw(fn, "x", xa);
  const int64_t C = d[1];
  const float* ps = checked<float>(fn, "scale", scale, {C});
  const float* pb = checked<float>(fn, "shift", shift, {C});
  const float* pm = checked<float>(fn, "mean", mean, {C});
  const float* pv = checked<float>(fn, "var", var, {C});
  check_var(fn, pv, C, check_eps(fn, eps));
  Arr ya = arr(fn, "y", y, true);
  same_shape(fn, "x", xa, "y", ya);
  same_or_disjoint(fn, "y", ya, "x", xa);
  for (auto p : {std::make_pair("scale", scale), std::make_pair("shift", shift), std::make_pair("mean", mean),
                 std::make_pair("var", var)})
    disjoint(fn, "y", ya, p.first, arr(fn, p.first, p.second));
  py::gil_scoped_release nogil;
  ftte::batchnorm_forward(xa.data, ps, pb, pm, pv, eps, ya.data, d[0], C, d[2]);
}

void py_bn_backward(py::handle x, py::handle scale, py::handle mean, py::handle var, float eps, py::handle dy,
                    py::handle rows, py::handle dscale, py::handle dshift, py::handle dx, bool accumulate) {
  const std::string fn = "batchnorm_backward";
  if (x.is_none() && !dscale.is_none()) fail(fn, "x is required when dscale is requested");
  Arr dya = arr(fn, "dy", dy);
  auto d = nchw(fn, "dy", dya);
  const int64_t C = d[1];
  Arr xa;
  if (!x.is_none()) {
    xa = arr(fn, "x", x);
    same_shape(fn, "dy", dya, "x", xa);
  }
  const float* ps = checked<float>(fn, "scale", scale, {C});
  const float* pm = checked<float>(fn, "mean", mean, {C});
  const float* pv = checked<float>(fn, "var", var, {C});
  check_var(fn, pv, C, check_eps(fn, eps));
  std::vector<int32_t> r = ftte::rows_or_all(fn, rows, C);
  const int64_t R = static_cast<int64_t>(r.size());
  std::vector<std::pair<const char*, Arr>> ins = {{"dy", dya}, {"scale", arr(fn, "scale", scale)},
                                                  {"mean", arr(fn, "mean", mean)}, {"var", arr(fn, "var", var)}};
  if (!x.is_none()) ins.push_back({"x", xa});
  std::vector<std::pair<const char*, Arr>> outs;
  float *pds = nullptr, *pdb = nullptr, *pdx = nullptr;
  if (!dscale.is_none()) {
    pds = checked<float>(fn, "dscale", dscale, {R}, true);
    outs.push_back({"dscale", arr(fn, "dscale", dscale, true)});
  }
  if (!dshift.is_none()) {
    pdb = checked<float>(fn, "dshift", dshift, {R}, true);
    outs.push_back({"dshift", arr(fn, "dshift", dshift, true)});
  }
  for (const auto& o : outs) {
    for (const auto& i : ins) disjoint(fn, o.first, o.second, i.first, i.second);
    for (const auto& o2 : outs)
      if (o.first != o2.first) disjoint(fn, o.first, o.second, o2.first, o2.second);
  }
  if (!dx.is_none()) {
    Arr dxa = arr(fn, "dx", dx, true);
    same_shape(fn, "dy", dya, "dx", dxa);
    same_or_disjoint(fn, "dx", dxa, "dy", dya);
    for (size_t k = 1; k < ins.size(); ++k) disjoint(fn, "dx", dxa, ins[k].first, ins[k].second);
    for (const auto& o : outs) disjoint(fn, "dx", dxa, o.first, o.second);
    pdx = dxa.data;
  }
  const int32_t* prows = rows.is_none() ? nullptr : r.data();
  py::gil_scoped_release nogil;
  ftte::batchnorm_backward(xa.data, ps, pm, pv, eps, dya.data, d[0], C, d[2], prows, R, pds, pdb, pdx, accumulate);
}

// b must broadcast onto a's shape (numpy rules, result shape == a's shape).
ftte::Broadcast broadcast(const std::string& fn, const Arr& a, const Arr& b) {
  bool ok = b.shape.size() <= a.shape.size();
  const size_t pad = ok ? a.shape.size() - b.shape.size() : 0;
  for (size_t i = 0; ok && i < b.shape.size(); ++i) ok = b.shape[i] == 1 || b.shape[i] == a.shape[pad + i];
  if (!ok)
    fail(fn, "b of shape " + shape_of(b.shape) + " does not broadcast to a's shape " + shape_of(a.shape));
  return ftte::make_broadcast(a.shape, b.shape);
}

template <void (*F)(const ftte::Broadcast&, const float*, const float*, float*)>
void py_binary_forward(const char* name, py::handle a, py::handle b, py::handle y) {
  const std::string fn = name;
  Arr aa = arr(fn, "a", a), ba = arr(fn, "b", b), ya = arr(fn, "y", y, true);
  ftte::Broadcast g = broadcast(fn, aa, ba);
  same_shape(fn, "a", aa, "y", ya);
  same_or_disjoint(fn, "y", ya, "a", aa);
  same_or_disjoint(fn, "y", ya, "b", ba);
  py::gil_scoped_release nogil;
  F(g, aa.data, ba.data, ya.data);
}

void py_add_backward(py::handle dy, py::handle b_shape, py::handle da, py::handle db, bool accumulate) {
  const std::string fn = "add_backward";
  Arr dya = arr(fn, "dy", dy);
  Arr dba, daa;
  if (!db.is_none()) {
    dba = arr(fn, "db", db, true);
    if (!b_shape.is_none()) fail(fn, "pass b_shape only without db (db's shape is b's shape)");
  } else if (!b_shape.is_none()) {
    if (!py::isinstance<py::sequence>(b_shape) || py::isinstance<py::str>(b_shape))
      fail(fn, "b_shape must be a sequence of ints");
    for (auto h : py::reinterpret_borrow<py::sequence>(b_shape)) {
      if (py::isinstance<py::bool_>(h) || !PyIndex_Check(h.ptr())) fail(fn, "b_shape must hold integers");
      dba.shape.push_back(py::reinterpret_steal<py::int_>(PyNumber_Index(h.ptr())).cast<int64_t>());
    }
  }
  ftte::Broadcast g = broadcast(fn, dya, dba);
  if (!db.is_none()) disjoint(fn, "db", dba, "dy", dya);
  if (!da.is_none()) {
    daa = arr(fn, "da", da, true);
    same_shape(fn, "dy", dya, "da", daa);
    if (accumulate)
      disjoint(fn, "da", daa, "dy", dya);
    else
      same_or_disjoint(fn, "da", daa, "dy", dya);
    if (!db.is_none()) disjoint(fn, "da", daa, "db", dba);
  }
  py::gil_scoped_release nogil;
  ftte::add_backward(g, dya.data, daa.data, dba.data, accumulate);
}

void py_mul_backward(py::handle a, py::handle b, py::handle dy, py::handle da, py::handle db, bool accumulate) {
  const std::string fn = "mul_backward";
  Arr aa = arr(fn, "a", a), ba = arr(fn, "b", b), dya = arr(fn, "dy", dy);
  ftte::Broadcast g = broadcast(fn, aa, ba);
  same_shape(fn, "a", aa, "dy", dya);
  Arr daa, dba;
  if (!db.is_none()) {
    dba = arr(fn, "db", db, true);
    same_shape(fn, "b", ba, "db", dba);
    disjoint(fn, "db", dba, "a", aa);
    disjoint(fn, "db", dba, "b", ba);
    disjoint(fn, "db", dba, "dy", dya);
  }
  if (!da.is_none()) {
    daa = arr(fn, "da", da, true);
    same_shape(fn, "a", aa, "da", daa);
    if (accumulate)
      disjoint(fn, "da", daa, "dy", dya);
    else
      same_or_disjoint(fn, "da", daa, "dy", dya);
    disjoint(fn, "da", daa, "b", ba);
    // da may be dy (db is computed first), but not a: the kernel reads a for db.
    disjoint(fn, "da", daa, "a", aa);
    if (!db.is_none()) disjoint(fn, "da", daa, "db", dba);
  }
  py::gil_scoped_release nogil;
  ftte::mul_backward(g, aa.data, ba.data, dya.data, daa.data, dba.data, accumulate);
}

std::vector<py::handle> as_list(const std::string& fn, const char* name, const py::handle& obj) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj) || py::isinstance<py::array>(obj))
    fail(fn, std::string(name) + " must be a list of arrays");
  std::vector<py::handle> out;
  for (auto h : py::reinterpret_borrow<py::sequence>(obj)) out.push_back(h);
  if (out.empty()) fail(fn, std::string(name) + " must hold at least one array");
  return out;
}

// Shapes [N, C_i, rest...] matching `whole` except on axis 1; returns the C_i.
std::vector<int64_t> concat_parts(const std::string& fn, const std::vector<Arr>& parts, const Arr& whole) {
  nchw(fn, "y", whole);
  std::vector<int64_t> cs;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Arr& p = parts[i];
    bool ok = p.shape.size() == whole.shape.size() && p.shape[0] == whole.shape[0];
    for (size_t k = 2; ok && k < p.shape.size(); ++k) ok = p.shape[k] == whole.shape[k];
    if (!ok)
      fail(fn, "xs[" + std::to_string(i) + "] has shape " + shape_of(p.shape) + " but must be " +
                   shape_of(whole.shape) + " except on axis 1");
    cs.push_back(p.shape[1]);
  }
  return cs;
}

void py_concat_forward(py::handle xs, py::handle y) {
  const std::string fn = "concat_forward";
  auto hs = as_list(fn, "xs", xs);
  Arr ya = arr(fn, "y", y, true);
  std::vector<Arr> parts;
  for (size_t i = 0; i < hs.size(); ++i) parts.push_back(arr(fn, ("xs[" + std::to_string(i) + "]").c_str(), hs[i]));
  auto cs = concat_parts(fn, parts, ya);
  int64_t total = 0;
  for (int64_t c : cs) total += c;
  if (total != ya.shape[1])
    fail(fn, "y has " + std::to_string(ya.shape[1]) + " channels but the inputs have " + std::to_string(total));
  std::vector<const float*> ptrs;
  for (size_t i = 0; i < parts.size(); ++i) {
    disjoint(fn, "y", ya, ("xs[" + std::to_string(i) + "]").c_str(), parts[i]);
    ptrs.push_back(parts[i].data);
  }
  auto d = nchw(fn, "y", ya);
  py::gil_scoped_release nogil;
  ftte::concat_forward(ptrs, cs, ya.data, d[0], d[2]);
}

void py_concat_backward(py::handle dy, py::handle channels, py::handle dxs, bool accumulate) {
  const std::string fn = "concat_backward";
  Arr dya = arr(fn, "dy", dy);
  auto d = nchw(fn, "dy", dya);
  std::vector<int64_t> cs;
  if (!py::isinstance<py::sequence>(channels) || py::isinstance<py::str>(channels))
    fail(fn, "channels must be a sequence of ints");
  for (auto h : py::reinterpret_borrow<py::sequence>(channels)) {
    if (py::isinstance<py::bool_>(h) || !PyIndex_Check(h.ptr())) fail(fn, "channels must hold integers");
    int64_t c = py::reinterpret_steal<py::int_>(PyNumber_Index(h.ptr())).cast<int64_t>();
    if (c < 0) fail(fn, "channels must be >= 0, got " + std::to_string(c));
    cs.push_back(c);
  }
  int64_t total = 0;
  for (int64_t c : cs) total += c;
  if (cs.empty() || total != d[1])
    fail(fn, "channels sum to " + std::to_string(total) + " but dy has " + std::to_string(d[1]));
  auto hs = as_list(fn, "dxs", dxs);
  if (hs.size() != cs.size())
    fail(fn, "dxs has " + std::to_string(hs.size()) + " entries but channels has " + std::to_string(cs.size()));
  std::vector<Arr> parts(hs.size());
  std::vector<float*> ptrs(hs.size(), nullptr);
  for (size_t i = 0; i < hs.size(); ++i) {
    if (hs[i].is_none()) continue;
    const std::string nm = "dxs[" + std::to_string(i) + "]";
    parts[i] = arr(fn, nm.c_str(), hs[i], true);
    std::vector<int64_t> want = dya.shape;
    want[1] = cs[i];
    if (parts[i].shape != want)
      fail(fn, nm + " has shape " + shape_of(parts[i].shape) + " but must be " + shape_of(want));
    disjoint(fn, nm.c_str(), parts[i], "dy", dya);
    for (size_t k = 0; k < i; ++k)
      if (ptrs[k]) disjoint(fn, nm.c_str(), parts[i], ("dxs[" + std::to_string(k) + "]").c_str(), parts[k]);
    ptrs[i] = parts[i].data;
  }
  py::gil_scoped_release nogil;
  ftte::concat_backward(dya.data, ptrs, cs, d[0], d[2], accumulate);
}

}  // namespace

void register_graph_ops(py::module_& m) {
  m.def("batchnorm_forward", &py_bn_forward, py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("mean"),
        py::arg("var"), py::arg("eps"), py::arg("y"),
        "Frozen-statistics batch norm over axis 1 of x[N, C, ...]: y = scale * (x - mean) / sqrt(var + eps) + "
        "shift, in place into y (which may be x).");
  m.def("batchnorm_backward", &py_bn_backward, py::arg("x"), py::arg("scale"), py::arg("mean"), py::arg("var"),
        py::arg("eps"), py::arg("dy"), py::arg("rows"), py::arg("dscale"), py::arg("dshift"), py::arg("dx"),
        py::arg("accumulate") = false,
        "Gradients for the selected channels (int32 [R] or None = all): dscale[R], dshift[R], and dx = dy * scale / "
        "sqrt(var + eps) over all channels (each may be None; dx may be dy). x is needed only for dscale. "
        "accumulate adds into dscale/dshift; dx is always overwritten.");
  m.def(
      "add_forward", [](py::handle a, py::handle b, py::handle y) { py_binary_forward<ftte::add_forward>("add_forward", a, b, y); },
      py::arg("a"), py::arg("b"), py::arg("y"),
      "y = a + b with b broadcast (numpy rules) onto a's shape; y has a's shape and may be a.");
  m.def(
      "mul_forward", [](py::handle a, py::handle b, py::handle y) { py_binary_forward<ftte::mul_forward>("mul_forward", a, b, y); },
      py::arg("a"), py::arg("b"), py::arg("y"),
      "y = a * b with b broadcast (numpy rules) onto a's shape; y has a's shape and may be a.");
  m.def("add_backward", &py_add_backward, py::arg("dy"), py::arg("b_shape") = py::none(), py::arg("da") = py::none(),
        py::arg("db") = py::none(), py::arg("accumulate") = false,
        "For y = a + b (b broadcast): da = dy (da may be dy or None), db = dy summed over b's broadcast axes "
        "(db has b's shape, or None; b_shape, only without db, just checks the broadcast). accumulate adds into "
        "da and db (da must then not be dy).");
  m.def("mul_backward", &py_mul_backward, py::arg("a"), py::arg("b"), py::arg("dy"), py::arg("da"), py::arg("db"),
        py::arg("accumulate") = false,
        "For y = a * b (b broadcast): da = dy * b (may be dy or None), db = (dy * a) summed over b's broadcast "
        "axes (b's shape, or None). accumulate adds into da and db (da must then not be dy).");
  m.def("concat_forward", &py_concat_forward, py::arg("xs"), py::arg("y"),
        "y = concatenation of the arrays xs[i][N, C_i, ...] along axis 1, into y[N, sum C_i, ...].");
  m.def("concat_backward", &py_concat_backward, py::arg("dy"), py::arg("channels"), py::arg("dxs"),
        py::arg("accumulate") = false,
        "Splits dy[N, sum C_i, ...] along axis 1 into dxs[i][N, C_i, ...] (channels = [C_i]; a None entry is "
        "skipped). accumulate adds into dxs.");
}

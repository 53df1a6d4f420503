// Python bindings for conv2d, pooling, activations and softmax cross-entropy. Every argument is
// checked here, with the GIL held, before any kernel sees a pointer; the kernels then run with
// the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "activation.h"
#include "check.h"
#include "conv2d.h"
#include "parallel.h"
#include "pool.h"
#include "xent.h"

namespace py = pybind11;
using ftte::as_int;
using ftte::checked;
using ftte::dim;
using ftte::fail;
using ftte::int_tuple;

namespace {

struct Window {
  int64_t kh, kw, sh, sw, pt, pl, pb, pr;
};

// kernel (kh, kw), stride (sh, sw) >= 1 and padding (top, left, bottom, right) >= 0.
Window parse_window(const std::string& fn, int64_t kh, int64_t kw, const py::handle& stride,
                    const py::handle& padding) {
  auto s = int_tuple<2>(fn, "stride", stride);
  auto p = int_tuple<4>(fn, "padding", padding);
  if (s[0] < 1 || s[1] < 1) fail(fn, "stride must be >= 1, got (" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ")");
  for (int64_t v : p)
    if (v < 0) fail(fn, "padding must be >= 0, got " + std::to_string(v));
  return Window{kh, kw, s[0], s[1], p[0], p[1], p[2], p[3]};
}

// Output (OH, OW); fails when the padded input is smaller than the kernel.
std::array<int64_t, 2> out_hw(const std::string& fn, int64_t H, int64_t W, const Window& w, bool ceil_mode) {
  int64_t OH = ftte::window_out_size(H, w.kh, w.sh, w.pt, w.pb, ceil_mode);
  int64_t OW = ftte::window_out_size(W, w.kw, w.sw, w.pl, w.pr, ceil_mode);
  if (OH < 1 || OW < 1)
    fail(fn, "kernel " + std::to_string(w.kh) + "x" + std::to_string(w.kw) + " does not fit the padded input " +
                 std::to_string(H + w.pt + w.pb) + "x" + std::to_string(W + w.pl + w.pr));
  return {OH, OW};
}

ftte::ConvGeom conv_geom(int64_t N, int64_t C, int64_t H, int64_t W, int64_t OC, const Window& w,
                         std::array<int64_t, 2> o) {
  return ftte::ConvGeom{N, C, H, W, OC, w.kh, w.kw, w.sh, w.sw, w.pt, w.pl, w.pb, w.pr, o[0], o[1]};
}

// The geometry a scratch-size query names: x_shape [N, C, H, W], w_shape [OC, C, KH, KW].
ftte::ConvGeom scratch_geom(const std::string& fn, const py::handle& x_shape, const py::handle& w_shape,
                            const py::handle& stride, const py::handle& padding) {
  const auto xs = int_tuple<4>(fn, "x_shape", x_shape);
  const auto ws = int_tuple<4>(fn, "w_shape", w_shape);
  for (int64_t v : xs)
    if (v < 0) fail(fn, "x_shape must be >= 0");
  if (ws[0] < 0 || ws[1] != xs[1] || ws[2] < 1 || ws[3] < 1 || xs[1] < 1)
    fail(fn, "w_shape must be [OC, C, KH, KW] with C matching x_shape and a kernel of at least 1x1");
  const Window win = parse_window(fn, ws[2], ws[3], stride, padding);
  return conv_geom(xs[0], xs[1], xs[2], xs[3], ws[0], win, out_hw(fn, xs[2], xs[3], win, false));
}

// Pooling windows: padding must be smaller than the kernel so no window is padding only.
Window pool_window(const std::string& fn, const py::handle& kernel, const py::handle& stride,
                   const py::handle& padding) {
  auto k = int_tuple<2>(fn, "kernel", kernel);
  if (k[0] < 1 || k[1] < 1) fail(fn, "kernel must be >= 1");
  Window w = parse_window(fn, k[0], k[1], stride, padding);
  if (w.pt >= w.kh || w.pb >= w.kh || w.pl >= w.kw || w.pr >= w.kw)
    fail(fn, "padding must be smaller than the kernel on every side");
  return w;
}

ftte::PoolGeom pool_geom(int64_t N, int64_t C, int64_t H, int64_t W, const Window& w, std::array<int64_t, 2> o) {
  return ftte::PoolGeom{N, C, H, W, w.kh, w.kw, w.sh, w.sw, w.pt, w.pl, w.pb, w.pr, o[0], o[1]};
}

// Any-shape float32 array for the elementwise kernels: returns data pointer and element count.
struct Flat {
  float* data;
  int64_t size;
};
Flat flat(const std::string& fn, const char* name, const py::handle& obj, bool writable) {
  if (!py::isinstance<py::array>(obj)) fail(fn, std::string(name) + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<float>()))
    fail(fn, std::string(name) + " must have dtype float32, got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) fail(fn, std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) fail(fn, std::string(name) + " must be writable");
  if (reinterpret_cast<uintptr_t>(a.data()) % alignof(float) != 0)  // as in checked<T>: armv7 faults
    fail(fn, std::string(name) + " must be aligned to 4 bytes (np.require(a, requirements='A') makes an aligned copy)");
  return Flat{static_cast<float*>(const_cast<void*>(a.data())), static_cast<int64_t>(a.size())};
}

// In-place (same start) is fine for elementwise kernels; a shifted overlap would read cells
// already overwritten.
void same_or_disjoint(const std::string& fn, const char* an, const void* a, int64_t abytes, const char* bn,
                      const void* b, int64_t bbytes) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (pa == pb || abytes == 0 || bbytes == 0) return;
  if (pa < pb + static_cast<uintptr_t>(bbytes) && pb < pa + static_cast<uintptr_t>(abytes))
    fail(fn, std::string(an) + " and " + bn + " overlap without being the same array");
}

void check_same_size(const std::string& fn, const char* an, const Flat& a, const char* bn, const Flat& b) {
  if (a.size != b.size)
    fail(fn, std::string(an) + " has " + std::to_string(a.size) + " elements but " + bn + " has " +
                 std::to_string(b.size));
  same_or_disjoint(fn, an, a.data, a.size * 4, bn, b.data, b.size * 4);
}

// Any overlap at all is refused (the mask is bytes, the other array floats: same start is no use).
void disjoint(const std::string& fn, const char* an, const void* a, int64_t abytes, const char* bn, const void* b,
              int64_t bbytes) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (abytes == 0 || bbytes == 0) return;
  if (pa < pb + static_cast<uintptr_t>(bbytes) && pb < pa + static_cast<uintptr_t>(abytes))
    fail(fn, std::string(an) + " and " + bn + " share memory");
}

// A packed bit mask for n elements: a C-contiguous uint8 array (any shape) of exactly ceil(n/8) bytes.
uint8_t* bit_mask(const std::string& fn, const py::handle& obj, int64_t n, bool writable) {
  if (!py::isinstance<py::array>(obj)) fail(fn, "mask must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<uint8_t>()))
    fail(fn, "mask must have dtype uint8, got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) fail(fn, "mask must be C-contiguous");
  if (writable && !a.writeable()) fail(fn, "mask must be writable");
  const int64_t want = (n + 7) / 8;
  if (static_cast<int64_t>(a.size()) != want)
    fail(fn, "mask has " + std::to_string(a.size()) + " bytes but " + std::to_string(n) + " elements need " +
                 std::to_string(want));
  return static_cast<uint8_t*>(const_cast<void*>(a.data()));
}

using Unary = void (*)(int64_t, const float*, float*);
using Binary = void (*)(int64_t, const float*, const float*, float*);

void def_unary(py::module_& m, const char* name, Unary f, const char* doc) {
  m.def(
      name,
      [name, f](py::object x, py::object y) {
        const std::string fn = name;
        Flat xf = flat(fn, "x", x, false), yf = flat(fn, "y", y, true);
        check_same_size(fn, "x", xf, "y", yf);
        py::gil_scoped_release nogil;
        f(xf.size, xf.data, yf.data);
      },
      py::arg("x"), py::arg("y"), doc);
}

void def_backward(py::module_& m, const char* name, Binary f, const char* doc) {
  m.def(
      name,
      [name, f](py::object y, py::object dy, py::object dx) {
        const std::string fn = name;
        Flat yf = flat(fn, "y", y, false), dyf = flat(fn, "dy", dy, false), dxf = flat(fn, "dx", dx, true);
        check_same_size(fn, "y", yf, "dy", dyf);
        check_same_size(fn, "dy", dyf, "dx", dxf);
        check_same_size(fn, "y", yf, "dx", dxf);
        py::gil_scoped_release nogil;
        f(yf.size, yf.data, dyf.data, dxf.data);
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), doc);
}

// A Python number (float, int or NumPy scalar; not a bool or a string) as the float32 the
// kernel will use, so a bound like 1e-50 is judged after it rounds to 0 in float32.
float as_float(const std::string& fn, const char* name, const py::handle& h) {
  if (py::isinstance<py::bool_>(h) || py::isinstance<py::str>(h) || py::isinstance<py::bytes>(h))
    fail(fn, std::string(name) + " must be a number");
  PyObject* f = PyNumber_Float(h.ptr());
  if (f == nullptr) {
    PyErr_Clear();
    fail(fn, std::string(name) + " must be a number");
  }
  const double d = py::reinterpret_steal<py::float_>(f).cast<double>();
  return static_cast<float>(d);
}

float finite_float(const std::string& fn, const char* name, const py::handle& h) {
  const float v = as_float(fn, name, h);
  if (!std::isfinite(v)) fail(fn, std::string(name) + " must be finite in float32, got " + std::string(py::str(h)));
  return v;
}

// Clip bounds: either may be infinite (an open side), neither NaN, lo <= hi.
std::array<float, 2> clip_bounds(const std::string& fn, const py::handle& lo, const py::handle& hi) {
  const float l = as_float(fn, "lo", lo), u = as_float(fn, "hi", hi);
  if (std::isnan(l) || std::isnan(u)) fail(fn, "lo and hi must not be NaN");
  if (l > u) fail(fn, "lo must be <= hi, got lo=" + std::string(py::str(lo)) + " > hi=" + std::string(py::str(hi)));
  return {l, u};
}

// x -> y elementwise after the shared checks; `run(n, x, y)` is called without the GIL.
template <class Run>
void unary_checked(const std::string& fn, const py::object& x, const py::object& y, const Run& run) {
  Flat xf = flat(fn, "x", x, false), yf = flat(fn, "y", y, true);
  check_same_size(fn, "x", xf, "y", yf);
  py::gil_scoped_release nogil;
  run(xf.size, xf.data, yf.data);
}

// (a, dy) -> dx elementwise after the shared checks; a is the forward output y, or the input x
// when `a_apart_from_dx` (hardswish: dx must not share memory with x even at the same start).
template <class Run>
void backward_checked(const std::string& fn, const char* an, const py::object& a, const py::object& dy,
                      const py::object& dx, bool a_apart_from_dx, const Run& run) {
  Flat af = flat(fn, an, a, false), dyf = flat(fn, "dy", dy, false), dxf = flat(fn, "dx", dx, true);
  check_same_size(fn, an, af, "dy", dyf);
  check_same_size(fn, "dy", dyf, "dx", dxf);
  check_same_size(fn, an, af, "dx", dxf);
  if (a_apart_from_dx && af.size > 0 && af.data == dxf.data)
    fail(fn, std::string(an) + " and dx must not share memory (dx may be dy)");
  py::gil_scoped_release nogil;
  run(af.size, af.data, dyf.data, dxf.data);
}

const int32_t* checked_labels(const std::string& fn, const py::handle& labels, int64_t N, int64_t C) {
  const int32_t* lab = checked<int32_t>(fn, "labels", labels, {N});
  for (int64_t i = 0; i < N; ++i)
    if (lab[i] < 0 || lab[i] >= C)
      fail(fn, "labels[" + std::to_string(i) + "] = " + std::to_string(lab[i]) + " is outside [0, " +
                   std::to_string(C) + ")");
  return lab;
}

// The largest of p[0, n), each plus `add` mod 256 (1: the fused ReLU's sentinel 255 wraps to 0,
// below every position). 16 bytes to a vector (GCC/Clang vector extensions: SSE2 or NEON) rather
// than left to the auto-vectoriser, whose code for this loop varied by 10% of the whole
// backward from one build to the next.
uint8_t max_byte_plus(const uint8_t* p, int64_t n, uint8_t add) {
  typedef uint8_t v16u __attribute__((vector_size(16)));
  v16u top = {}, plus = {};
  plus += add;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16u v;
    std::memcpy(&v, p + i, 16);
    v += plus;
    top = v > top ? v : top;
  }
  uint8_t m = 0;
  for (int k = 0; k < 16; ++k) m = std::max(m, static_cast<uint8_t>(top[k]));
  for (; i < n; ++i) m = std::max(m, static_cast<uint8_t>(p[i] + add));
  return m;
}

}  // namespace

void register_conv(py::module_& m) {
  const auto stride1 = py::make_tuple(1, 1);
  const auto pad0 = py::make_tuple(0, 0, 0, 0);

  m.def(
      "window_out_size",
      [](int64_t in, int64_t k, int64_t stride, int64_t pad_begin, int64_t pad_end, bool ceil_mode) {
        const std::string fn = "window_out_size";
        if (in < 0 || k < 1 || stride < 1 || pad_begin < 0 || pad_end < 0)
          fail(fn, "need in >= 0, k >= 1, stride >= 1, pads >= 0");
        return ftte::window_out_size(in, k, stride, pad_begin, pad_end, ceil_mode);
      },
      py::arg("in_size"), py::arg("kernel"), py::arg("stride"), py::arg("pad_begin"), py::arg("pad_end"),
      py::arg("ceil_mode") = false,
      "Output length along one axis for conv/pooling (<= 0: the kernel does not fit). With ceil_mode a last "
      "window starting inside the end padding is dropped, as onnxruntime and PyTorch do.");

  // ---- conv2d ----
  m.def(
      "conv2d_forward",
      [](py::object x, py::object w, py::object b, py::object y, py::object stride, py::object padding,
         py::object w_scale, py::object w_trained, py::object row_slot) {
        const std::string fn = "conv2d_forward";
        const float* xp = checked<float>(fn, "x", x, {-1, -1, -1, -1});
        const int64_t N = dim(x, 0), C = dim(x, 1), H = dim(x, 2), W = dim(x, 3);
        int64_t OC = 0;
        const ftte::WeightView wp = ftte::checked_weight(fn, w, w_scale, w_trained, row_slot, {-1, C, -1, -1}, &OC);
        const int64_t KH = dim(w, 2), KW = dim(w, 3);
        if (KH < 1 || KW < 1 || C < 1) fail(fn, "w must have C >= 1 and a kernel of at least 1x1");
        const float* bp = b.is_none() ? nullptr : checked<float>(fn, "b", b, {OC});
        const Window win = parse_window(fn, KH, KW, stride, padding);
        const auto o = out_hw(fn, H, W, win, false);
        float* yp = checked<float>(fn, "y", y, {N, OC, o[0], o[1]}, true);
        same_or_disjoint(fn, "x", xp, N * C * H * W * 4, "y", yp, N * OC * o[0] * o[1] * 4);
        if (xp == yp && N * C * H * W > 0) fail(fn, "y must not be x");
        const ftte::ConvGeom g = conv_geom(N, C, H, W, OC, win, o);
        py::gil_scoped_release nogil;
        ftte::conv2d_forward(g, xp, wp, bp, yp);
      },
      py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("stride") = stride1,
      py::arg("padding") = pad0, py::arg("w_scale") = py::none(), py::arg("w_trained") = py::none(),
      py::arg("row_slot") = py::none(),
      "y[N,OC,OH,OW] = conv2d(x[N,C,H,W], w[OC,C,KH,KW]) + b[OC] (b may be None). stride (sh, sw); "
      "padding ONNX-style (top, left, bottom, right). w float32, or int8 with w_scale float32 [OC], or mixed "
      "(a partly trained layer): w int8 [Q,C,KH,KW] frozen channels with w_scale [Q], w_trained float32 "
      "[R,C,KH,KW] trained ones, row_slot int32 [OC] (>= 0: a w_trained row, < 0: w row ~slot).");

  m.def(
      "conv2d_backward",
      [](py::object x, py::object w, py::object dy, py::object rows, py::object dw, py::object db, py::object dx,
         py::object stride, py::object padding, bool accumulate, py::object w_scale, py::object w_trained,
         py::object row_slot) {
        const std::string fn = "conv2d_backward";
        int64_t OC = 0;
        const ftte::WeightView wp = ftte::checked_weight(fn, w, w_scale, w_trained, row_slot, {-1, -1, -1, -1}, &OC);
        const int64_t C = dim(w, 1), KH = dim(w, 2), KW = dim(w, 3);
        if (KH < 1 || KW < 1 || C < 1) fail(fn, "w must have C >= 1 and a kernel of at least 1x1");
        const Window win = parse_window(fn, KH, KW, stride, padding);
        // The input size comes from x, else from dx; with neither (bias gradient only) dy's
        // own size is taken as it is.
        const float* xp = nullptr;
        float* dxp = nullptr;
        int64_t N = -1, H = -1, W = -1;
        if (!x.is_none()) {
          xp = checked<float>(fn, "x", x, {-1, C, -1, -1});
          N = dim(x, 0), H = dim(x, 2), W = dim(x, 3);
        } else if (!dw.is_none()) {
          fail(fn, "x is needed to compute dw");
        }
        if (!dx.is_none()) {
          dxp = checked<float>(fn, "dx", dx, {N, C, H, W}, true);
          N = dim(dx, 0), H = dim(dx, 2), W = dim(dx, 3);
        }
        std::array<int64_t, 2> o{-1, -1};
        if (H >= 0) o = out_hw(fn, H, W, win, false);
        const float* dyp = checked<float>(fn, "dy", dy, {N, OC, o[0], o[1]});
        if (H < 0) N = dim(dy, 0), o = {dim(dy, 2), dim(dy, 3)};
        std::vector<int32_t> sel;
        const int32_t* rp = nullptr;
        int64_t R = OC;
        if (!rows.is_none()) {
          sel = ftte::rows_or_all(fn, rows, OC);
          rp = sel.data();
          R = static_cast<int64_t>(sel.size());
        }
        float* dwp = dw.is_none() ? nullptr : checked<float>(fn, "dw", dw, {R, C, KH, KW}, true);
        float* dbp = db.is_none() ? nullptr : checked<float>(fn, "db", db, {R}, true);
        const ftte::ConvGeom g = conv_geom(N, C, H, W, OC, win, o);
        py::gil_scoped_release nogil;
        ftte::conv2d_backward(g, xp, wp, dyp, rp, R, dwp, dbp, dxp, accumulate);
      },
      py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("rows"), py::arg("dw"), py::arg("db"), py::arg("dx"),
      py::arg("stride") = stride1, py::arg("padding") = pad0, py::arg("accumulate") = false,
      py::arg("w_scale") = py::none(), py::arg("w_trained") = py::none(), py::arg("row_slot") = py::none(),
      "Gradients of conv2d_forward (w float32, int8 with w_scale [OC], or mixed as for conv2d_forward; only dx reads it). rows: int32 [R] output channels (None: all). dw[R,C,KH,KW], db[R] "
      "(None to skip; accumulate=True adds into them) and dx[N,C,H,W] (None to skip; overwritten, all "
      "output channels contribute).");

  m.def(
      "conv2d_backward_sgd",
      [](py::object x, py::object w, py::object b, py::object dy, py::object rows, py::object dx, bool train_bias,
         py::object vw, py::object vb, float lr, float momentum, float weight_decay, py::object stride,
         py::object padding, py::object w_scale, py::object w_trained, py::object row_slot) {
        const std::string fn = "conv2d_backward_sgd";
        // float32 w is updated in place; a mixed one (w int8 frozen channels + w_trained) in w_trained.
        const bool mixed = !w_trained.is_none() || !row_slot.is_none();
        if (!mixed && !w_scale.is_none())
          fail(fn, "w_scale is for a mixed weight only (a whole-int8 weight never trains)");
        int64_t OC = 0;
        const ftte::WeightView wp =
            mixed ? ftte::checked_weight(fn, w, w_scale, w_trained, row_slot, {-1, -1, -1, -1}, &OC, true)
                  : ftte::WeightView(checked<float>(fn, "w", w, {-1, -1, -1, -1}, true));
        if (!mixed) OC = dim(w, 0);
        const int64_t C = dim(w, 1), KH = dim(w, 2), KW = dim(w, 3);
        if (KH < 1 || KW < 1 || C < 1) fail(fn, "w must have C >= 1 and a kernel of at least 1x1");
        const Window win = parse_window(fn, KH, KW, stride, padding);
        const float* dyp = checked<float>(fn, "dy", dy, {-1, OC, -1, -1});
        const int64_t N = dim(dy, 0);
        std::vector<int32_t> sel = ftte::unique_rows_or_all(fn, rows, OC);
        const int64_t R = static_cast<int64_t>(sel.size());
        ftte::check_mixed_rows(fn, wp, rows.is_none() ? nullptr : sel.data(), R, w_trained);
        // The input size comes from x, else from dx (x is only read for the weight rows).
        const float* xp = nullptr;
        float* dxp = nullptr;
        int64_t H = -1, W = -1;
        if (!x.is_none()) {
          xp = checked<float>(fn, "x", x, {N, C, -1, -1});
          H = dim(x, 2), W = dim(x, 3);
        } else if (R > 0) {
          fail(fn, "x is required when weight rows train");
        }
        if (!dx.is_none()) {
          dxp = checked<float>(fn, "dx", dx, {N, C, H, W}, true);
          H = dim(dx, 2), W = dim(dx, 3);
        }
        std::array<int64_t, 2> o{dim(dy, 2), dim(dy, 3)};
        if (H >= 0) {
          o = out_hw(fn, H, W, win, false);
          checked<float>(fn, "dy", dy, {N, OC, o[0], o[1]});
        }
        float* bp = nullptr;
        if (train_bias) {
          if (b.is_none()) fail(fn, "b is required when the bias trains");
          bp = checked<float>(fn, "b", b, {OC}, true);
        }
        float* vwp = vw.is_none() ? nullptr : checked<float>(fn, "vw", vw, {R, C, KH, KW}, true);
        float* vbp = vb.is_none() ? nullptr : checked<float>(fn, "vb", vb, {OC}, true);
        if (momentum != 0.f && R > 0 && !vwp) fail(fn, "vw is required when momentum != 0");
        if (momentum != 0.f && train_bias && !vbp) fail(fn, "vb is required when momentum != 0");
        // Everything written (w, b, dx, vw, vb) must be disjoint from everything else.
        const std::pair<const char*, py::handle> arrays[] = {{mixed ? "w_trained" : "w", mixed ? w_trained : w},
                                                             {"b", train_bias ? py::handle(b) : py::handle(Py_None)},
                                                             {"dx", dx}, {"vw", vw}, {"vb", vb},
                                                             {"x", x}, {"dy", dy},
                                                             {"w", mixed ? py::handle(w) : py::handle(Py_None)},
                                                             {"w_scale", w_scale}, {"row_slot", row_slot}};
        for (size_t i = 0; i < 5; ++i)
          for (size_t j = i + 1; j < std::size(arrays); ++j) {
            if (arrays[i].second.is_none() || arrays[j].second.is_none()) continue;
            const py::array a = py::reinterpret_borrow<py::array>(arrays[i].second);
            const py::array c = py::reinterpret_borrow<py::array>(arrays[j].second);
            disjoint(fn, arrays[i].first, a.data(), a.nbytes(), arrays[j].first, c.data(), c.nbytes());
          }
        if (H < 0) H = o[0], W = o[1];  // bias only (no x, no dx): the input size is never read
        const ftte::ConvGeom g = conv_geom(N, C, H, W, OC, win, o);
        const int32_t* rp = rows.is_none() ? nullptr : sel.data();
        py::gil_scoped_release nogil;
        ftte::conv2d_backward_sgd(g, xp, wp, bp, dyp, rp, R, dxp, train_bias, vwp, vbp,
                                  ftte::SgdStep{lr, momentum, weight_decay});
      },
      py::arg("x"), py::arg("w"), py::arg("b"), py::arg("dy"), py::arg("rows"), py::arg("dx"), py::arg("train_bias"),
      py::arg("vw"), py::arg("vb"), py::arg("lr"), py::arg("momentum") = 0.0f, py::arg("weight_decay") = 0.0f,
      py::arg("stride") = stride1, py::arg("padding") = pad0, py::arg("w_scale") = py::none(),
      py::arg("w_trained") = py::none(), py::arg("row_slot") = py::none(),
      "Backward and SGD update of conv2d without gradient buffers: dx (None to skip) from the weights before "
      "the update, then the bias b[OC] (when train_bias) and output channels `rows` (unique int32 [R], None = "
      "all) of w, as sgd_update_rows would from conv2d_backward's gradients, w's in tiles of at most 256 KiB "
      "of gradient rows. vw[R,C,KH,KW] / vb[OC]: velocity, required when momentum != 0. A mixed w (as for "
      "conv2d_forward; rows = its trained channels, row_slot[rows[r]] == r): the update lands in w_trained.");

  m.def(
      "conv2d_backward_sgd_scratch_bytes",
      [](py::object x_shape, py::object w_shape, py::object stride, py::object padding, py::object n_rows,
         bool train_bias, bool dx, int threads, bool int8_weight) {
        const std::string fn = "conv2d_backward_sgd_scratch_bytes";
        const ftte::ConvGeom g = scratch_geom(fn, x_shape, w_shape, stride, padding);
        const int64_t R = n_rows.is_none() ? g.OC : as_int(fn, "n_rows", n_rows);
        if (R < 0 || R > g.OC) fail(fn, "n_rows must be in [0, OC]");
        return ftte::conv2d_backward_sgd_scratch_bytes(g, R, train_bias, dx,
                                                       threads > 0 ? threads : ftte::get_num_threads(), int8_weight);
      },
      py::arg("x_shape"), py::arg("w_shape"), py::arg("stride") = stride1, py::arg("padding") = pad0,
      py::arg("n_rows") = py::none(), py::arg("train_bias") = true, py::arg("dx") = true, py::arg("threads") = 0,
      py::arg("int8_weight") = false,
      "Most scratch bytes conv2d_backward_sgd holds for these shapes (n_rows trained output channels, None: "
      "all) with `threads` threads (0: the current setting); exact at one thread. int8_weight: w is mixed.");

  m.def(
      "conv2d_scratch_bytes",
      [](py::object x_shape, py::object w_shape, py::object stride, py::object padding, bool backward,
         py::object n_rows, bool dw, bool dx, int threads, bool int8_weight) {
        const std::string fn = "conv2d_scratch_bytes";
        const ftte::ConvGeom g = scratch_geom(fn, x_shape, w_shape, stride, padding);
        const int64_t R = n_rows.is_none() ? g.OC : as_int(fn, "n_rows", n_rows);
        if (R < 0) fail(fn, "n_rows must be >= 0");
        return ftte::conv2d_scratch_bytes(g, backward, R, dw, dx, threads > 0 ? threads : ftte::get_num_threads(),
                                          int8_weight);
      },
      py::arg("x_shape"), py::arg("w_shape"), py::arg("stride") = stride1, py::arg("padding") = pad0,
      py::arg("backward") = false, py::arg("n_rows") = py::none(), py::arg("dw") = true, py::arg("dx") = true,
      py::arg("threads") = 0, py::arg("int8_weight") = false,
      "Most bytes of scratch (im2col columns, dW partial sums) conv2d_forward or, with backward=True, "
      "conv2d_backward holds for these shapes with `threads` threads (0: the current setting); n_rows: "
      "selected output channels (None: all); dw/dx: whether those gradients are asked for. Includes "
      "the packing buffers of the GEMM calls (int8_weight: the weight is int8, packed and dequantised).");

  // ---- pooling ----
  m.def(
      "maxpool2d_forward",
      [](py::object x, py::object y, py::object argmax, py::object kernel, py::object stride, py::object padding,
         bool ceil_mode, bool relu) {
        const std::string fn = "maxpool2d_forward";
        const float* xp = checked<float>(fn, "x", x, {-1, -1, -1, -1});
        const int64_t N = dim(x, 0), C = dim(x, 1), H = dim(x, 2), W = dim(x, 3);
        const Window win = pool_window(fn, kernel, stride, padding);
        const auto o = out_hw(fn, H, W, win, ceil_mode);
        float* yp = checked<float>(fn, "y", y, {N, C, o[0], o[1]}, true);
        same_or_disjoint(fn, "x", xp, N * C * H * W * 4, "y", yp, N * C * o[0] * o[1] * 4);
        if (xp == yp && N * C > 0) fail(fn, "y must not be x");
        const ftte::PoolGeom g = pool_geom(N, C, H, W, win, o);
        const int64_t outs = N * C * o[0] * o[1];
        const bool window_argmax = !argmax.is_none() && py::isinstance<py::array>(argmax) &&
                                   py::reinterpret_borrow<py::array>(argmax).dtype().is(py::dtype::of<uint8_t>());
        if (relu && !argmax.is_none() && !window_argmax)
          fail(fn, "relu=True keeps a uint8 argmax (window positions) or none");
        if (relu && !window_argmax) {
          py::gil_scoped_release nogil;
          ftte::maxpool2d_relu_forward_window(g, xp, yp, nullptr);
          return;
        }
        if (window_argmax) {
          // relu: position 255 is the sentinel of an all-gated window, so no cell may have it.
          if (win.kh * win.kw > (relu ? 255 : 256))
            fail(fn, "a uint8 argmax holds window positions, so the kernel must have at most " +
                         std::string(relu ? "255 cells with relu=True" : "256 cells") + ", got " +
                         std::to_string(win.kh) + "x" + std::to_string(win.kw));
          uint8_t* ap = checked<uint8_t>(fn, "argmax", argmax, {N, C, o[0], o[1]}, true);
          same_or_disjoint(fn, "x", xp, N * C * H * W * 4, "argmax", ap, outs);
          same_or_disjoint(fn, "y", yp, outs * 4, "argmax", ap, outs);
          if ((static_cast<const void*>(ap) == xp || static_cast<const void*>(ap) == yp) && outs > 0)
            fail(fn, "argmax must not share memory with x or y");
          py::gil_scoped_release nogil;
          if (relu)
            ftte::maxpool2d_relu_forward_window(g, xp, yp, ap);
          else
            ftte::maxpool2d_forward_window(g, xp, yp, ap);
          return;
        }
        if (H * W > std::numeric_limits<int32_t>::max()) fail(fn, "input plane too large for int32 argmax");
        int32_t* ap = argmax.is_none() ? nullptr : checked<int32_t>(fn, "argmax", argmax, {N, C, o[0], o[1]}, true);
        py::gil_scoped_release nogil;
        ftte::maxpool2d_forward(g, xp, yp, ap);
      },
      py::arg("x"), py::arg("y"), py::arg("argmax"), py::arg("kernel"), py::arg("stride"), py::arg("padding") = pad0,
      py::arg("ceil_mode") = false, py::arg("relu") = false,
      "y = max over each window; argmax (like y, or None) gets the first max: int32 holds its flat index h*W+w in "
      "the input plane, uint8 (kernels of at most 256 cells) its position (ih - oh*sh + pt)*KW + (iw - ow*sw + pl) "
      "inside the window. Padding never wins. relu=True: the max over relu(x) (x > 0 ? x : +0), a ReLU fused into "
      "the pool; a uint8 argmax (kernels of at most 255 cells) gets 255 where y is +0 (ReLU's gradient is 0 there).");

  m.def(
      "maxpool2d_backward",
      [](py::object dy, py::object argmax, py::object dx, py::object kernel, py::object stride, py::object padding,
         bool ceil_mode, bool relu) {
        const std::string fn = "maxpool2d_backward";
        const float* dyp = checked<float>(fn, "dy", dy, {-1, -1, -1, -1});
        const int64_t N = dim(dy, 0), C = dim(dy, 1), OH = dim(dy, 2), OW = dim(dy, 3);
        float* dxp = checked<float>(fn, "dx", dx, {N, C, -1, -1}, true);
        const int64_t H = dim(dx, 2), W = dim(dx, 3), HW = H * W;
        same_or_disjoint(fn, "dy", dyp, N * C * OH * OW * 4, "dx", dxp, N * C * HW * 4);
        if (dxp == dyp && N * C * OH * OW > 0) fail(fn, "dx must not be dy");
        const bool window_argmax = py::isinstance<py::array>(argmax) &&
                                   py::reinterpret_borrow<py::array>(argmax).dtype().is(py::dtype::of<uint8_t>());
        if (relu && !window_argmax) fail(fn, "relu=True takes the uint8 argmax of maxpool2d_forward(relu=True)");
        if (window_argmax) {
          if (kernel.is_none() || stride.is_none())
            fail(fn, "a uint8 argmax holds window positions: kernel and stride must be given");
          const Window win = pool_window(fn, kernel, stride, padding);
          const auto o = out_hw(fn, H, W, win, ceil_mode);
          if (o[0] != OH || o[1] != OW)
            fail(fn, "dy has shape (" + std::to_string(OH) + ", " + std::to_string(OW) + ") per plane but this window "
                     "gives (" + std::to_string(o[0]) + ", " + std::to_string(o[1]) + ")");
          const uint8_t* ap = checked<uint8_t>(fn, "argmax", argmax, {N, C, OH, OW});
          const ftte::PoolGeom g = pool_geom(N, C, H, W, win, o);
          // Every position must name a real cell of its window (the scatter trusts it). Row and
          // column of each position come from tables: no division per output.
          if (win.kh * win.kw > (relu ? 255 : 256))
            fail(fn, "a uint8 argmax holds window positions, so the kernel must have at most " +
                         std::string(relu ? "255 cells with relu=True" : "256 cells"));
          std::array<int64_t, 256> row_of{}, col_of{};
          for (int64_t r = 0; r < 256; ++r) {
            const bool in = r < win.kh * win.kw;  // outside the window: a row no input has
            row_of[static_cast<size_t>(r)] = in ? r / win.kw : std::numeric_limits<int32_t>::max();
            col_of[static_cast<size_t>(r)] = in ? r % win.kw : 0;
          }
          auto refuse = [&](size_t r) {
            fail(fn, "argmax holds " + std::to_string(r) + ", not a real cell of its " + std::to_string(win.kh) + "x" +
                         std::to_string(win.kw) + " window");
          };
          // A window wholly inside the input takes any position below KH*KW: one vectorisable max
          // over all outputs covers those; only windows reaching into padding or past the end
          // are checked cell by cell.
          const int64_t outs = N * C * OH * OW;
          // relu: the sentinel 255 wraps to 0 and every position p to p + 1, so the sentinel is
          // never the top; without relu 255 is a position like any other.
          const int shift = relu ? 1 : 0;
          const uint8_t top = max_byte_plus(ap, outs, static_cast<uint8_t>(shift));
          if (top >= win.kh * win.kw + shift) refuse(static_cast<size_t>(top - shift));
          auto inside = [](int64_t start, int64_t k, int64_t size) { return start >= 0 && start + k <= size; };
          // Columns whose windows reach outside, listed once: a row of windows inside the input
          // visits only those (none at all without padding or ceil_mode; a loop over every output
          // skipping the inside ones took 30 us of the CNN-28 pool1 backward's 52). Same cells in
          // the same order as a full scan, so the same first refusal.
          std::vector<int64_t> edge_cols, all_cols(static_cast<size_t>(OW));
          for (int64_t ow = 0; ow < OW; ++ow) {
            all_cols[static_cast<size_t>(ow)] = ow;
            if (!inside(ow * win.sw - win.pl, win.kw, W)) edge_cols.push_back(ow);
          }
          bool any_edge = !edge_cols.empty();
          for (int64_t oh = 0; oh < OH; ++oh) any_edge = any_edge || !inside(oh * win.sh - win.pt, win.kh, H);
          for (int64_t p = 0; p < N * C && any_edge; ++p)
            for (int64_t oh = 0; oh < OH; ++oh) {
              const int64_t h_start = oh * win.sh - win.pt;
              for (const int64_t ow : inside(h_start, win.kh, H) ? edge_cols : all_cols) {
                const int64_t w_start = ow * win.sw - win.pl;
                const size_t r = ap[(p * OH + oh) * OW + ow];
                if (relu && r == ftte::kReluPoolGated) continue;  // no cell: nothing to check
                const int64_t ih = h_start + row_of[r], iw = w_start + col_of[r];
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) refuse(r);
              }
            }
          py::gil_scoped_release nogil;
          if (relu)
            ftte::maxpool2d_relu_backward_window(g, dyp, ap, dxp);
          else
            ftte::maxpool2d_backward_window(g, dyp, ap, dxp);
          return;
        }
        const int32_t* ap = checked<int32_t>(fn, "argmax", argmax, {N, C, OH, OW});
        // A branch-free OR of out-of-range flags first (as unsigned, a negative is out of range
        // too; it vectorises, a loop that may fail at any element does not), then the element
        // by element scan only to name the first bad value.
        // Any int32 >= 0 is in range of a plane of 2^31 cells or more, so the bound fits 32 bits.
        const uint32_t bound = static_cast<uint32_t>(std::min<int64_t>(HW, int64_t{1} << 31));
        uint32_t bad = 0;
        for (int64_t i = 0, n = N * C * OH * OW; i < n; ++i) bad |= static_cast<uint32_t>(ap[i]) >= bound;
        for (int64_t i = 0, n = bad ? N * C * OH * OW : 0; i < n; ++i)
          if (ap[i] < 0 || ap[i] >= HW)
            fail(fn, "argmax holds " + std::to_string(ap[i]) + ", outside the input plane [0, " + std::to_string(HW) +
                         ")");
        py::gil_scoped_release nogil;
        ftte::maxpool2d_backward(N * C, HW, OH * OW, dyp, ap, dxp);
      },
      py::arg("dy"), py::arg("argmax"), py::arg("dx"), py::arg("kernel") = py::none(), py::arg("stride") = py::none(),
      py::arg("padding") = pad0, py::arg("ceil_mode") = false, py::arg("relu") = false,
      "dx[N,C,H,W] = 0, then dy scattered (+=) to the argmax positions from maxpool2d_forward. A uint8 (window) "
      "argmax needs the forward's kernel, stride, padding and ceil_mode; an int32 one ignores them. relu=True: "
      "the backward of maxpool2d_forward(relu=True), ReLU's gate included (a window whose argmax is 255 gets "
      "+0): bit-identical to relu_backward_mask over the unfused pool backward.");

  m.def(
      "avgpool2d_forward",
      [](py::object x, py::object y, py::object kernel, py::object stride, py::object padding, bool ceil_mode,
         bool count_include_pad) {
        const std::string fn = "avgpool2d_forward";
        const float* xp = checked<float>(fn, "x", x, {-1, -1, -1, -1});
        const int64_t N = dim(x, 0), C = dim(x, 1), H = dim(x, 2), W = dim(x, 3);
        const Window win = pool_window(fn, kernel, stride, padding);
        const auto o = out_hw(fn, H, W, win, ceil_mode);
        float* yp = checked<float>(fn, "y", y, {N, C, o[0], o[1]}, true);
        same_or_disjoint(fn, "x", xp, N * C * H * W * 4, "y", yp, N * C * o[0] * o[1] * 4);
        if (xp == yp && N * C > 0) fail(fn, "y must not be x");
        const ftte::PoolGeom g = pool_geom(N, C, H, W, win, o);
        py::gil_scoped_release nogil;
        ftte::avgpool2d_forward(g, xp, yp, count_include_pad);
      },
      py::arg("x"), py::arg("y"), py::arg("kernel"), py::arg("stride"), py::arg("padding") = pad0,
      py::arg("ceil_mode") = false, py::arg("count_include_pad") = false,
      "ONNX AveragePool. Divisor: real cells in the window, or with count_include_pad the window clipped to "
      "the padded input.");

  m.def(
      "avgpool2d_backward",
      [](py::object dy, py::object dx, py::object kernel, py::object stride, py::object padding, bool ceil_mode,
         bool count_include_pad) {
        const std::string fn = "avgpool2d_backward";
        float* dxp = checked<float>(fn, "dx", dx, {-1, -1, -1, -1}, true);
        const int64_t N = dim(dx, 0), C = dim(dx, 1), H = dim(dx, 2), W = dim(dx, 3);
        const Window win = pool_window(fn, kernel, stride, padding);
        const auto o = out_hw(fn, H, W, win, ceil_mode);
        const float* dyp = checked<float>(fn, "dy", dy, {N, C, o[0], o[1]});
        same_or_disjoint(fn, "dy", dyp, N * C * o[0] * o[1] * 4, "dx", dxp, N * C * H * W * 4);
        if (dxp == dyp && N * C > 0) fail(fn, "dx must not be dy");
        const ftte::PoolGeom g = pool_geom(N, C, H, W, win, o);
        py::gil_scoped_release nogil;
        ftte::avgpool2d_backward(g, dyp, dxp, count_include_pad);
      },
      py::arg("dy"), py::arg("dx"), py::arg("kernel"), py::arg("stride"), py::arg("padding") = pad0,
      py::arg("ceil_mode") = false, py::arg("count_include_pad") = false,
      "Gradient of avgpool2d_forward; dx[N,C,H,W] is overwritten and gives the input size.");

  m.def(
      "global_avgpool_forward",
      [](py::object x, py::object y) {
        const std::string fn = "global_avgpool_forward";
        const float* xp = checked<float>(fn, "x", x, {-1, -1, -1, -1});
        const int64_t N = dim(x, 0), C = dim(x, 1), HW = dim(x, 2) * dim(x, 3);
        if (HW < 1) fail(fn, "x must have H, W >= 1");
        float* yp = checked<float>(fn, "y", y, {N, C}, true);
        same_or_disjoint(fn, "x", xp, N * C * HW * 4, "y", yp, N * C * 4);
        if (xp == yp && N * C > 0) fail(fn, "y must not be x");
        py::gil_scoped_release nogil;
        ftte::global_avgpool_forward(N * C, HW, xp, yp);
      },
      py::arg("x"), py::arg("y"), "y[N,C] = mean of x[N,C,H,W] over H and W.");

  m.def(
      "global_avgpool_backward",
      [](py::object dy, py::object dx) {
        const std::string fn = "global_avgpool_backward";
        const float* dyp = checked<float>(fn, "dy", dy, {-1, -1});
        const int64_t N = dim(dy, 0), C = dim(dy, 1);
        float* dxp = checked<float>(fn, "dx", dx, {N, C, -1, -1}, true);
        const int64_t HW = dim(dx, 2) * dim(dx, 3);
        if (HW < 1) fail(fn, "dx must have H, W >= 1");
        same_or_disjoint(fn, "dy", dyp, N * C * 4, "dx", dxp, N * C * HW * 4);
        if (dxp == dyp && N * C > 0) fail(fn, "dx must not be dy");
        py::gil_scoped_release nogil;
        ftte::global_avgpool_backward(N * C, HW, dyp, dxp);
      },
      py::arg("dy"), py::arg("dx"), "dx[N,C,H,W] = dy[N,C] / (H*W) broadcast over the plane.");

  // ---- activations (any shape; output may be the input for in-place) ----
  def_unary(m, "relu_forward", ftte::relu_forward, "y = max(x, 0); y may be x.");
  def_backward(m, "relu_backward", ftte::relu_backward, "dx = dy * (y > 0), y the forward output; dx may be dy.");
  m.def(
      "relu_forward_mask",
      [](py::object x, py::object y, py::object mask) {
        const std::string fn = "relu_forward_mask";
        Flat xf = flat(fn, "x", x, false), yf = flat(fn, "y", y, true);
        check_same_size(fn, "x", xf, "y", yf);
        uint8_t* mp = bit_mask(fn, mask, xf.size, true);
        const int64_t mbytes = (xf.size + 7) / 8;
        disjoint(fn, "mask", mp, mbytes, "x", xf.data, xf.size * 4);
        disjoint(fn, "mask", mp, mbytes, "y", yf.data, yf.size * 4);
        py::gil_scoped_release nogil;
        ftte::relu_forward_mask(xf.size, xf.data, yf.data, mp);
      },
      py::arg("x"), py::arg("y"), py::arg("mask"),
      "y = max(x, 0); mask (uint8, ceil(n/8) bytes) gets bit k of byte i = x[8i+k] > 0 (np.packbits "
      "bitorder='little'). y may be x.");
  m.def(
      "relu_backward_mask",
      [](py::object mask, py::object dy, py::object dx) {
        const std::string fn = "relu_backward_mask";
        Flat dyf = flat(fn, "dy", dy, false), dxf = flat(fn, "dx", dx, true);
        check_same_size(fn, "dy", dyf, "dx", dxf);
        const uint8_t* mp = bit_mask(fn, mask, dyf.size, false);
        disjoint(fn, "mask", mp, (dyf.size + 7) / 8, "dx", dxf.data, dxf.size * 4);
        py::gil_scoped_release nogil;
        ftte::relu_backward_mask(dyf.size, mp, dyf.data, dxf.data);
      },
      py::arg("mask"), py::arg("dy"), py::arg("dx"),
      "dx = dy where the mask bit from relu_forward_mask is set, else 0; dx may be dy.");
  def_unary(m, "sigmoid_forward", ftte::sigmoid_forward, "y = 1 / (1 + exp(-x)); y may be x.");
  def_backward(m, "sigmoid_backward", ftte::sigmoid_backward, "dx = dy * y * (1 - y), y the forward output.");
  def_unary(m, "tanh_forward", ftte::tanh_forward, "y = tanh(x); y may be x.");
  def_backward(m, "tanh_backward", ftte::tanh_backward, "dx = dy * (1 - y^2), y the forward output.");

  // Parametrised activations (ONNX LeakyRelu, HardSigmoid, Clip/ReLU6, HardSwish). Gradients at
  // the kinks follow PyTorch; see activation.h.
  m.def(
      "leaky_relu_forward",
      [](py::object x, py::object y, py::object alpha) {
        const std::string fn = "leaky_relu_forward";
        const float a = finite_float(fn, "alpha", alpha);
        unary_checked(fn, x, y, [a](int64_t n, const float* xp, float* yp) { ftte::leaky_relu_forward(n, xp, yp, a); });
      },
      py::arg("x"), py::arg("y"), py::arg("alpha"),
      "y = x if x > 0 else alpha*x; y may be x. Any finite alpha (backward needs alpha > 0).");
  m.def(
      "leaky_relu_backward",
      [](py::object y, py::object dy, py::object dx, py::object alpha) {
        const std::string fn = "leaky_relu_backward";
        const float a = finite_float(fn, "alpha", alpha);
        // From the output, y > 0 must mean x > 0: true only for a positive slope.
        if (!(a > 0.f))
          fail(fn, "alpha must be > 0 (the gradient is read from the output), got " + std::string(py::str(alpha)));
        backward_checked(fn, "y", y, dy, dx, false, [a](int64_t n, const float* yp, const float* dyp, float* dxp) {
          ftte::leaky_relu_backward(n, yp, dyp, dxp, a);
        });
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("alpha"),
      "dx = dy if y > 0 else alpha*dy, y the forward output; dx may be dy; alpha > 0.");
  m.def(
      "hardsigmoid_forward",
      [](py::object x, py::object y, py::object alpha, py::object beta) {
        const std::string fn = "hardsigmoid_forward";
        const float a = finite_float(fn, "alpha", alpha), b = finite_float(fn, "beta", beta);
        unary_checked(fn, x, y, [a, b](int64_t n, const float* xp, float* yp) {
          ftte::hardsigmoid_forward(n, xp, yp, a, b);
        });
      },
      py::arg("x"), py::arg("y"), py::arg("alpha"), py::arg("beta"),
      "y = max(0, min(1, alpha*x + beta)); y may be x. ONNX defaults alpha=0.2, beta=0.5; "
      "PyTorch's hardsigmoid is alpha=1/6, beta=0.5.");
  m.def(
      "hardsigmoid_backward",
      [](py::object y, py::object dy, py::object dx, py::object alpha) {
        const std::string fn = "hardsigmoid_backward";
        const float a = finite_float(fn, "alpha", alpha);
        backward_checked(fn, "y", y, dy, dx, false, [a](int64_t n, const float* yp, const float* dyp, float* dxp) {
          ftte::hardsigmoid_backward(n, yp, dyp, dxp, a);
        });
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("alpha"),
      "dx = alpha*dy where 0 < y < 1 else 0, y the forward output; dx may be dy.");
  m.def(
      "clip_forward",
      [](py::object x, py::object y, py::object lo, py::object hi) {
        const std::string fn = "clip_forward";
        const auto b = clip_bounds(fn, lo, hi);
        unary_checked(fn, x, y, [b](int64_t n, const float* xp, float* yp) {
          ftte::clip_forward(n, xp, yp, b[0], b[1]);
        });
      },
      py::arg("x"), py::arg("y"), py::arg("lo"), py::arg("hi"),
      "y = min(max(x, lo), hi); y may be x. lo may be -inf, hi +inf; lo <= hi, no NaN. ReLU6 is lo=0, hi=6.");
  m.def(
      "clip_backward",
      [](py::object y, py::object dy, py::object dx, py::object lo, py::object hi) {
        const std::string fn = "clip_backward";
        const auto b = clip_bounds(fn, lo, hi);
        backward_checked(fn, "y", y, dy, dx, false, [b](int64_t n, const float* yp, const float* dyp, float* dxp) {
          ftte::clip_backward(n, yp, dyp, dxp, b[0], b[1]);
        });
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("lo"), py::arg("hi"),
      "dx = dy where lo < y < hi else 0 (0 on a bound, as PyTorch's hardtanh/relu6), y the forward output; "
      "dx may be dy.");
  m.def(
      "hardswish_forward",
      [](py::object x, py::object y) { unary_checked("hardswish_forward", x, y, ftte::hardswish_forward); },
      py::arg("x"), py::arg("y"), "y = x * max(0, min(1, x/6 + 1/2)) (ONNX HardSwish); y may be x.");
  m.def(
      "hardswish_backward",
      [](py::object x, py::object dy, py::object dx) {
        backward_checked("hardswish_backward", "x", x, dy, dx, true, ftte::hardswish_backward);
      },
      py::arg("x"), py::arg("dy"), py::arg("dx"),
      "From the forward INPUT x: dx = 0 for x < -3, dy*(x/3 + 1/2) for -3 <= x <= 3, dy for x > 3 (PyTorch's edges). "
      "dx may be dy but must not share memory with x.");

  // ---- softmax cross-entropy ----
  m.def(
      "softmax_xent_forward",
      [](py::object logits, py::object labels, py::object probs) {
        const std::string fn = "softmax_xent_forward";
        const float* zp = checked<float>(fn, "logits", logits, {-1, -1});
        const int64_t N = dim(logits, 0), C = dim(logits, 1);
        if (N < 1 || C < 1) fail(fn, "logits must have at least one row and one class");
        const int32_t* lp = checked_labels(fn, labels, N, C);
        float* pp = checked<float>(fn, "probs", probs, {N, C}, true);
        same_or_disjoint(fn, "logits", zp, N * C * 4, "probs", pp, N * C * 4);
        py::gil_scoped_release nogil;
        return ftte::softmax_xent_forward(N, C, zp, lp, pp);
      },
      py::arg("logits"), py::arg("labels"), py::arg("probs"),
      "probs = softmax(logits) row-wise (probs may be logits); returns the mean cross-entropy over rows.");

  m.def(
      "softmax_xent_backward",
      [](py::object probs, py::object labels, py::object dlogits, float scale) {
        const std::string fn = "softmax_xent_backward";
        const float* pp = checked<float>(fn, "probs", probs, {-1, -1});
        const int64_t N = dim(probs, 0), C = dim(probs, 1);
        const int32_t* lp = checked_labels(fn, labels, N, C);
        float* dp = checked<float>(fn, "dlogits", dlogits, {N, C}, true);
        same_or_disjoint(fn, "probs", pp, N * C * 4, "dlogits", dp, N * C * 4);
        py::gil_scoped_release nogil;
        ftte::softmax_xent_backward(N, C, pp, lp, dp, scale);
      },
      py::arg("probs"), py::arg("labels"), py::arg("dlogits"), py::arg("scale"),
      "dlogits = (probs - onehot(labels)) * scale (pass 1/N for the mean loss); dlogits may be probs.");
}

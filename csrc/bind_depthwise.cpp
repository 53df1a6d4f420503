// Python bindings for depthwise and grouped convolution. Same conventions and checks as
// conv2d's (bind_conv.cpp): every argument is checked with the GIL held, then the kernels run
// with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "conv2d.h"
#include "depthwise.h"
#include "parallel.h"

namespace py = pybind11;
using ftte::as_int;
using ftte::checked;
using ftte::dim;
using ftte::fail;
using ftte::int_tuple;

namespace {

// Geometry from shapes, stride and padding; fails when the kernel does not fit.
ftte::ConvGeom geom(const std::string& fn, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OC, int64_t KH,
                    int64_t KW, const py::handle& stride, const py::handle& padding) {
  auto s = int_tuple<2>(fn, "stride", stride);
  auto p = int_tuple<4>(fn, "padding", padding);
  if (s[0] < 1 || s[1] < 1) fail(fn, "stride must be >= 1");
  for (int64_t v : p)
    if (v < 0) fail(fn, "padding must be >= 0");
  ftte::ConvGeom g{N, C, H, W, OC, KH, KW, s[0], s[1], p[0], p[1], p[2], p[3], -1, -1};
  if (H >= 0) {
    g.OH = ftte::window_out_size(H, KH, g.sh, g.pt, g.pb, false);
    g.OW = ftte::window_out_size(W, KW, g.sw, g.pl, g.pr, false);
    if (g.OH < 1 || g.OW < 1)
      fail(fn, "kernel " + std::to_string(KH) + "x" + std::to_string(KW) + " does not fit the padded input " +
                   std::to_string(H + g.pt + g.pb) + "x" + std::to_string(W + g.pl + g.pr));
  }
  return g;
}

void disjoint(const std::string& fn, const char* an, const void* a, int64_t abytes, const char* bn, const void* b,
              int64_t bbytes) {
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  if (abytes == 0 || bbytes == 0) return;
  if (pa < pb + static_cast<uintptr_t>(bbytes) && pb < pa + static_cast<uintptr_t>(abytes))
    fail(fn, std::string(an) + " and " + bn + " must not overlap");
}

// group: 0 means depthwise (weight [C*M, 1, KH, KW]); otherwise weight [OC, C/group, KH, KW].
int64_t weight_channels(const std::string& fn, int64_t group, int64_t C) {
  if (group == 0) return 1;
  if (group < 1) fail(fn, "group must be >= 1");
  if (C % group != 0)
    fail(fn, "group " + std::to_string(group) + " does not divide the " + std::to_string(C) + " input channels");
  return C / group;
}

void check_oc(const std::string& fn, int64_t group, int64_t C, int64_t OC) {
  if (group == 0) {
    if (OC < C || OC % C != 0)
      fail(fn, "w must have C*M output channels (M >= 1) for " + std::to_string(C) + " input channels, got " +
                   std::to_string(OC));
  } else if (OC % group != 0) {
    fail(fn, "group " + std::to_string(group) + " does not divide the " + std::to_string(OC) + " output channels");
  }
}

void forward(const std::string& fn, int64_t group, py::object x, py::object w, py::object b, py::object y,
             py::object stride, py::object padding, py::object w_scale) {
  const float* xp = checked<float>(fn, "x", x, {-1, -1, -1, -1});
  const int64_t N = dim(x, 0), C = dim(x, 1), H = dim(x, 2), W = dim(x, 3);
  if (C < 1) fail(fn, "x must have C >= 1");
  const int64_t Cw = weight_channels(fn, group, C);
  const ftte::WeightView wp = ftte::checked_weight(fn, w, w_scale, {-1, Cw, -1, -1});
  const int64_t OC = dim(w, 0), KH = dim(w, 2), KW = dim(w, 3);
  if (KH < 1 || KW < 1) fail(fn, "w must have a kernel of at least 1x1");
  check_oc(fn, group, C, OC);
  const float* bp = b.is_none() ? nullptr : checked<float>(fn, "b", b, {OC});
  const ftte::ConvGeom g = geom(fn, N, C, H, W, OC, KH, KW, stride, padding);
  float* yp = checked<float>(fn, "y", y, {N, OC, g.OH, g.OW}, true);
  disjoint(fn, "x", xp, N * C * H * W * 4, "y", yp, N * OC * g.OH * g.OW * 4);
  disjoint(fn, "w", ftte::weight_data(wp), OC * Cw * KH * KW * ftte::weight_elem_bytes(wp), "y", yp,
           N * OC * g.OH * g.OW * 4);
  py::gil_scoped_release nogil;
  if (group == 0)
    ftte::depthwise_conv2d_forward(g, xp, wp, bp, yp);
  else
    ftte::grouped_conv2d_forward(g, group, xp, wp, bp, yp);
}

void backward(const std::string& fn, int64_t group, py::object x, py::object w, py::object dy, py::object rows,
              py::object dw, py::object db, py::object dx, py::object stride, py::object padding, bool accumulate,
              py::object w_scale) {
  const ftte::WeightView wp = ftte::checked_weight(fn, w, w_scale, {-1, -1, -1, -1});
  const int64_t OC = dim(w, 0), Cw = dim(w, 1), KH = dim(w, 2), KW = dim(w, 3);
  if (KH < 1 || KW < 1) fail(fn, "w must have a kernel of at least 1x1");
  if (group == 0 && Cw != 1) fail(fn, "w has shape with dimension 1 = " + std::to_string(Cw) + " but it must be 1");
  if (Cw < 1) fail(fn, "w must have at least one input channel per group");
  // Input channels: C*M == OC for depthwise needs x or dx; grouped: C = Cw * group.
  const float* xp = nullptr;
  float* dxp = nullptr;
  int64_t N = -1, C = -1, H = -1, W = -1;
  if (group > 0) C = Cw * group;
  if (!x.is_none()) {
    xp = checked<float>(fn, "x", x, {-1, C, -1, -1});
    N = dim(x, 0), C = dim(x, 1), H = dim(x, 2), W = dim(x, 3);
  } else if (!dw.is_none()) {
    fail(fn, "x is needed to compute dw");
  }
  if (!dx.is_none()) {
    dxp = checked<float>(fn, "dx", dx, {N, C, H, W}, true);
    N = dim(dx, 0), C = dim(dx, 1), H = dim(dx, 2), W = dim(dx, 3);
  }
  if (group == 0 && C < 0) C = OC;  // bias gradient only: any multiplier will do
  if (C < 1) fail(fn, "x must have C >= 1");
  if (group > 0) weight_channels(fn, group, C);
  check_oc(fn, group, C, OC);
  ftte::ConvGeom g = geom(fn, N, C, H, W, OC, KH, KW, stride, padding);
  const float* dyp = checked<float>(fn, "dy", dy, {N, OC, g.OH, g.OW});
  if (H < 0) g.N = dim(dy, 0), g.OH = dim(dy, 2), g.OW = dim(dy, 3);
  std::vector<int32_t> sel;
  const int32_t* rp = nullptr;
  int64_t R = OC;
  if (!rows.is_none()) {
    sel = ftte::rows_or_all(fn, rows, OC);
    rp = sel.data();
    R = static_cast<int64_t>(sel.size());
  }
  float* dwp = dw.is_none() ? nullptr : checked<float>(fn, "dw", dw, {R, Cw, KH, KW}, true);
  float* dbp = db.is_none() ? nullptr : checked<float>(fn, "db", db, {R}, true);
  const int64_t ybytes = g.N * OC * g.OH * g.OW * 4;
  if (dxp) {
    disjoint(fn, "dy", dyp, ybytes, "dx", dxp, g.N * C * H * W * 4);
    disjoint(fn, "w", ftte::weight_data(wp), OC * Cw * KH * KW * ftte::weight_elem_bytes(wp), "dx", dxp,
             g.N * C * H * W * 4);
  }
  py::gil_scoped_release nogil;
  if (group == 0)
    ftte::depthwise_conv2d_backward(g, xp, wp, dyp, rp, R, dwp, dbp, dxp, accumulate);
  else
    ftte::grouped_conv2d_backward(g, group, xp, wp, dyp, rp, R, dwp, dbp, dxp, accumulate);
}

}  // namespace

void register_depthwise(py::module_& m) {
  const auto stride1 = py::make_tuple(1, 1);
  const auto pad0 = py::make_tuple(0, 0, 0, 0);

  m.def(
      "depthwise_conv2d_forward",
      [](py::object x, py::object w, py::object b, py::object y, py::object stride, py::object padding,
         py::object w_scale) { forward("depthwise_conv2d_forward", 0, x, w, b, y, stride, padding, w_scale); },
      py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("stride") = stride1,
      py::arg("padding") = pad0, py::arg("w_scale") = py::none(),
      "y[N,C*M,OH,OW] = depthwise conv(x[N,C,H,W], w[C*M,1,KH,KW]) + b[C*M] (b may be None): output "
      "channel oc reads input channel oc // M (ONNX Conv with group=C). Direct kernel; at stride 1 it pads each "
      "plane into scratch (depthwise_conv2d_scratch_bytes).");

  m.def(
      "depthwise_conv2d_backward",
      [](py::object x, py::object w, py::object dy, py::object rows, py::object dw, py::object db, py::object dx,
         py::object stride, py::object padding, bool accumulate, py::object w_scale) {
        backward("depthwise_conv2d_backward", 0, x, w, dy, rows, dw, db, dx, stride, padding, accumulate, w_scale);
      },
      py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("rows"), py::arg("dw"), py::arg("db"), py::arg("dx"),
      py::arg("stride") = stride1, py::arg("padding") = pad0, py::arg("accumulate") = false,
      py::arg("w_scale") = py::none(),
      "Gradients of depthwise_conv2d_forward. rows: int32 [R] output channels (None: all). dw[R,1,KH,KW], "
      "db[R] (None to skip; accumulate=True adds into them) and dx[N,C,H,W] (None to skip; overwritten).");

  m.def(
      "grouped_conv2d_forward",
      [](py::object x, py::object w, py::object b, py::object y, int64_t group, py::object stride,
         py::object padding, py::object w_scale) {
        const std::string fn = "grouped_conv2d_forward";
        if (group < 1) fail(fn, "group must be >= 1");
        forward(fn, group, x, w, b, y, stride, padding, w_scale);
      },
      py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("group"), py::arg("stride") = stride1,
      py::arg("padding") = pad0, py::arg("w_scale") = py::none(),
      "y[N,OC,OH,OW] = grouped conv(x[N,C,H,W], w[OC,C/group,KH,KW]) + b[OC] (ONNX Conv with group); C "
      "and OC divisible by group. im2col + GEMM per image and group.");

  m.def(
      "grouped_conv2d_backward",
      [](py::object x, py::object w, py::object dy, py::object rows, py::object dw, py::object db, py::object dx,
         int64_t group, py::object stride, py::object padding, bool accumulate, py::object w_scale) {
        const std::string fn = "grouped_conv2d_backward";
        if (group < 1) fail(fn, "group must be >= 1");
        backward(fn, group, x, w, dy, rows, dw, db, dx, stride, padding, accumulate, w_scale);
      },
      py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("rows"), py::arg("dw"), py::arg("db"), py::arg("dx"),
      py::arg("group"), py::arg("stride") = stride1, py::arg("padding") = pad0, py::arg("accumulate") = false,
      py::arg("w_scale") = py::none(),
      "Gradients of grouped_conv2d_forward. rows: int32 [R] output channels (None: all). dw[R,C/group,KH,KW], "
      "db[R] (None to skip; accumulate=True adds into them) and dx[N,C,H,W] (None to skip; overwritten).");
  m.def(
      "grouped_conv2d_scratch_bytes",
      [](py::object x_shape, py::object w_shape, int64_t group, py::object stride, py::object padding, bool backward,
         py::object rows, bool dw, bool db, bool dx, int threads, bool int8_weight) {
        const std::string fn = "grouped_conv2d_scratch_bytes";
        const auto xs = int_tuple<4>(fn, "x_shape", x_shape);
        const auto ws = int_tuple<4>(fn, "w_shape", w_shape);
        for (int64_t v : xs)
          if (v < 0) fail(fn, "x_shape must be >= 0");
        if (group < 1) fail(fn, "group must be >= 1");
        const int64_t Cw = weight_channels(fn, group, xs[1]);
        if (xs[1] < 1 || ws[0] < 0 || ws[1] != Cw || ws[2] < 1 || ws[3] < 1)
          fail(fn, "w_shape must be [OC, C/group, KH, KW] with a kernel of at least 1x1");
        check_oc(fn, group, xs[1], ws[0]);
        const ftte::ConvGeom g = geom(fn, xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], stride, padding);
        std::vector<int32_t> sel;
        const int32_t* rp = nullptr;
        int64_t R = ws[0];
        if (!rows.is_none()) {
          sel = ftte::rows_or_all(fn, rows, ws[0]);
          rp = sel.data();
          R = static_cast<int64_t>(sel.size());
        }
        return ftte::grouped_conv2d_scratch_bytes(g, group, backward, rp, R, dw, db, dx,
                                                  threads > 0 ? threads : ftte::get_num_threads(), int8_weight);
      },
      py::arg("x_shape"), py::arg("w_shape"), py::arg("group"), py::arg("stride") = stride1,
      py::arg("padding") = pad0, py::arg("backward") = false, py::arg("rows") = py::none(), py::arg("dw") = true,
      py::arg("db") = true, py::arg("dx") = true, py::arg("threads") = 0, py::arg("int8_weight") = false,
      "Most bytes of scratch grouped_conv2d_forward or, with backward=True, grouped_conv2d_backward holds "
      "(im2col columns, GEMM packing, regrouped dW/db sums when rows are out of group order) with `threads` "
      "threads (0: the current setting); exact on one thread. The depthwise kernels: "
      "depthwise_conv2d_scratch_bytes.");
  m.def(
      "depthwise_conv2d_scratch_bytes",
      [](py::object x_shape, py::object w_shape, py::object stride, py::object padding, bool backward, bool dw,
         bool dx, int threads) {
        const std::string fn = "depthwise_conv2d_scratch_bytes";
        const auto xs = int_tuple<4>(fn, "x_shape", x_shape);
        const auto ws = int_tuple<4>(fn, "w_shape", w_shape);
        for (int64_t v : xs)
          if (v < 0) fail(fn, "x_shape must be >= 0");
        if (xs[1] < 1 || ws[0] < 1 || ws[1] != 1 || ws[2] < 1 || ws[3] < 1 || ws[0] % xs[1] != 0)
          fail(fn, "w_shape must be [C*M, 1, KH, KW] for an input of C channels");
        const ftte::ConvGeom g = geom(fn, xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], stride, padding);
        return ftte::depthwise_conv2d_scratch_bytes(g, backward, dw, dx, threads > 0 ? threads : ftte::get_num_threads());
      },
      py::arg("x_shape"), py::arg("w_shape"), py::arg("stride") = stride1, py::arg("padding") = pad0,
      py::arg("backward") = false, py::arg("dw") = true, py::arg("dx") = true, py::arg("threads") = 0,
      "Most bytes of scratch depthwise_conv2d_forward or, with backward=True, depthwise_conv2d_backward holds with "
      "`threads` threads (0: the current setting; exact on one thread): at stride 1 a zero-padded input plane and "
      "an output plane at the padded pitch per task; none at other strides.");
}

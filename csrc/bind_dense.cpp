// Python bindings for sgemm, dense forward/backward and SGD on selected rows. Every argument is
// validated here with the GIL held; kernels then run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <iterator>
#include <string>
#include <vector>

#include "check.h"
#include "dense.h"
#include "gemm.h"
#include "optim.h"

namespace py = pybind11;
using ftte::checked;
using ftte::dim;
using ftte::fail;

namespace {

// Outputs must not share memory with inputs: the kernels read inputs while writing outputs.
void check_no_overlap(const std::string& fn, const char* out_name, const py::handle& out, const char* in_name,
                      const py::handle& in) {
  if (out.is_none() || in.is_none()) return;
  py::array a = py::reinterpret_borrow<py::array>(out), b = py::reinterpret_borrow<py::array>(in);
  auto lo_a = static_cast<const char*>(a.data()), lo_b = static_cast<const char*>(b.data());
  auto hi_a = lo_a + a.nbytes(), hi_b = lo_b + b.nbytes();
  if (a.nbytes() > 0 && b.nbytes() > 0 && lo_a < hi_b && lo_b < hi_a)
    fail(fn, std::string(out_name) + " must not share memory with " + in_name);
}

const float* opt_f32(const std::string& fn, const char* name, const py::handle& obj, std::initializer_list<int64_t> dims,
                     bool writable = false) {
  return obj.is_none() ? nullptr : checked<float>(fn, name, obj, dims, writable);
}

void py_sgemm(py::handle a, py::handle b, py::handle c, bool trans_a, bool trans_b, float alpha, float beta) {
  const std::string fn = "sgemm";
  const float* pa = checked<float>(fn, "a", a, {-1, -1});
  const int64_t M = trans_a ? dim(a, 1) : dim(a, 0), K = trans_a ? dim(a, 0) : dim(a, 1);
  const float* pb = trans_b ? checked<float>(fn, "b", b, {-1, K}) : checked<float>(fn, "b", b, {K, -1});
  const int64_t N = trans_b ? dim(b, 0) : dim(b, 1);
  float* pc = checked<float>(fn, "c", c, {M, N}, true);
  check_no_overlap(fn, "c", c, "a", a);
  check_no_overlap(fn, "c", c, "b", b);
  py::gil_scoped_release nogil;
  ftte::sgemm(M, N, K, alpha, ftte::GemmOperand{pa, dim(a, 1), trans_a}, ftte::GemmOperand{pb, dim(b, 1), trans_b},
              beta, pc, N);
}

void py_dense_forward(py::handle x, py::handle w, py::handle b, py::handle y, py::handle w_scale,
                      py::handle w_trained, py::handle row_slot) {
  const std::string fn = "dense_forward";
  const float* px = checked<float>(fn, "x", x, {-1, -1});
  const int64_t N = dim(x, 0), I = dim(x, 1);
  int64_t O = 0;
  const ftte::WeightView pw = ftte::checked_weight(fn, w, w_scale, w_trained, row_slot, {-1, I}, &O);
  const float* pb = opt_f32(fn, "b", b, {O});
  float* py_ = checked<float>(fn, "y", y, {N, O}, true);
  check_no_overlap(fn, "y", y, "x", x);
  check_no_overlap(fn, "y", y, "w", w);
  check_no_overlap(fn, "y", y, "b", b);
  check_no_overlap(fn, "y", y, "w_scale", w_scale);
  check_no_overlap(fn, "y", y, "w_trained", w_trained);
  check_no_overlap(fn, "y", y, "row_slot", row_slot);
  py::gil_scoped_release nogil;
  ftte::dense_forward(px, pw, pb, py_, N, I, O);
}

void py_dense_backward(py::handle x, py::handle w, py::handle dy, py::handle rows, py::handle dw, py::handle db,
                       py::handle dx, bool accumulate, py::handle w_scale, py::handle w_trained,
                       py::handle row_slot) {
  const std::string fn = "dense_backward";
  // x is only read for dw: a caller that wants no weight gradient need not keep it.
  if (x.is_none() && !dw.is_none()) fail(fn, "x is required when dw is requested");
  int64_t O = 0;
  const ftte::WeightView pw = ftte::checked_weight(fn, w, w_scale, w_trained, row_slot, {-1, -1}, &O);
  const int64_t I = dim(w, 1);
  const float* pdy = checked<float>(fn, "dy", dy, {-1, O});
  const int64_t N = dim(dy, 0);
  const float* px = x.is_none() ? nullptr : checked<float>(fn, "x", x, {N, I});
  std::vector<int32_t> r = ftte::rows_or_all(fn, rows, O);
  const int64_t R = static_cast<int64_t>(r.size());
  float* pdw = const_cast<float*>(opt_f32(fn, "dw", dw, {R, I}, true));
  float* pdb = const_cast<float*>(opt_f32(fn, "db", db, {R}, true));
  float* pdx = const_cast<float*>(opt_f32(fn, "dx", dx, {N, I}, true));
  const std::pair<const char*, py::handle> outs[] = {{"dw", dw}, {"db", db}, {"dx", dx}};
  const std::pair<const char*, py::handle> ins[] = {{"x", x},         {"w", w},
                                                    {"dy", dy},       {"w_scale", w_scale},
                                                    {"w_trained", w_trained}, {"row_slot", row_slot}};
  for (const auto& o : outs) {
    for (const auto& i : ins) check_no_overlap(fn, o.first, o.second, i.first, i.second);
    for (const auto& o2 : outs)
      if (o.first != o2.first) check_no_overlap(fn, o.first, o.second, o2.first, o2.second);
  }
  const int32_t* prows = rows.is_none() ? nullptr : r.data();
  py::gil_scoped_release nogil;
  ftte::dense_backward(px, pw, pdy, N, I, O, prows, R, pdw, pdb, pdx, accumulate);
}

void py_sgd_update_rows(py::handle param, py::handle rows, py::handle grad, py::handle velocity, float lr,
                        float momentum, float weight_decay) {
  const std::string fn = "sgd_update_rows";
  if (!py::isinstance<py::array>(param)) fail(fn, "param must be a numpy array");
  const int nd = static_cast<int>(py::reinterpret_borrow<py::array>(param).ndim());
  if (nd != 1 && nd != 2) fail(fn, "param must have 1 or 2 dimensions, got " + std::to_string(nd));
  float* pp = nd == 2 ? checked<float>(fn, "param", param, {-1, -1}, true) : checked<float>(fn, "param", param, {-1}, true);
  const int64_t O = dim(param, 0), F = nd == 2 ? dim(param, 1) : 1;
  std::vector<int32_t> r = ftte::unique_rows_or_all(fn, rows, O);
  const int64_t R = static_cast<int64_t>(r.size());
  const float* pg = nd == 2 ? checked<float>(fn, "grad", grad, {R, F}) : checked<float>(fn, "grad", grad, {R});
  float* pv = nullptr;
  if (!velocity.is_none())
    pv = nd == 2 ? checked<float>(fn, "velocity", velocity, {R, F}, true)
                 : checked<float>(fn, "velocity", velocity, {R}, true);
  else if (momentum != 0.f)
    fail(fn, "velocity is required when momentum != 0");
  check_no_overlap(fn, "param", param, "grad", grad);
  check_no_overlap(fn, "param", param, "velocity", velocity);
  check_no_overlap(fn, "velocity", velocity, "grad", grad);
  const int32_t* prows = rows.is_none() ? nullptr : r.data();
  py::gil_scoped_release nogil;
  ftte::sgd_update_rows(pp, O, F, prows, R, pg, pv, lr, momentum, weight_decay);
}

void py_dense_backward_sgd(py::handle x, py::handle w, py::handle b, py::handle dy, py::handle rows, py::handle dx,
                           bool train_bias, py::handle vw, py::handle vb, float lr, float momentum,
                           float weight_decay, py::handle w_scale, py::handle w_trained, py::handle row_slot) {
  const std::string fn = "dense_backward_sgd";
  // float32 w is updated in place; a mixed one (w int8 frozen rows + w_trained) in w_trained.
  const bool mixed = !w_trained.is_none() || !row_slot.is_none();
  if (!mixed && !w_scale.is_none()) fail(fn, "w_scale is for a mixed weight only (a whole-int8 weight never trains)");
  int64_t O = 0;
  const ftte::WeightView pw = mixed ? ftte::checked_weight(fn, w, w_scale, w_trained, row_slot, {-1, -1}, &O, true)
                                    : ftte::WeightView(checked<float>(fn, "w", w, {-1, -1}, true));
  if (!mixed) O = dim(w, 0);
  const int64_t I = dim(w, 1);
  const float* pdy = checked<float>(fn, "dy", dy, {-1, O});
  const int64_t N = dim(dy, 0);
  std::vector<int32_t> r = ftte::unique_rows_or_all(fn, rows, O);
  const int64_t R = static_cast<int64_t>(r.size());
  ftte::check_mixed_rows(fn, pw, rows.is_none() ? nullptr : r.data(), R, w_trained);
  if (x.is_none() && R > 0) fail(fn, "x is required when weight rows train");
  const float* px = x.is_none() ? nullptr : checked<float>(fn, "x", x, {N, I});
  float* pb = nullptr;
  if (train_bias) {
    if (b.is_none()) fail(fn, "b is required when the bias trains");
    pb = checked<float>(fn, "b", b, {O}, true);
  }
  float* pdx = const_cast<float*>(opt_f32(fn, "dx", dx, {N, I}, true));
  float* pvw = const_cast<float*>(opt_f32(fn, "vw", vw, {R, I}, true));
  float* pvb = const_cast<float*>(opt_f32(fn, "vb", vb, {O}, true));
  if (momentum != 0.f && R > 0 && !pvw) fail(fn, "vw is required when momentum != 0");
  if (momentum != 0.f && train_bias && !pvb) fail(fn, "vb is required when momentum != 0");
  // Everything written (w, b, dx, vw, vb) is disjoint from everything else (b only when written).
  const std::pair<const char*, py::handle> outs[] = {{mixed ? "w_trained" : "w", mixed ? w_trained : w},
                                                     {"b", train_bias ? b : py::handle(Py_None)},
                                                     {"dx", dx},
                                                     {"vw", vw},
                                                     {"vb", vb}};
  const std::pair<const char*, py::handle> ins[] = {{"x", x},
                                                    {"dy", dy},
                                                    {"w", mixed ? w : py::handle(Py_None)},
                                                    {"w_scale", w_scale},
                                                    {"row_slot", row_slot}};
  for (size_t i = 0; i < std::size(outs); ++i) {
    for (const auto& in : ins) check_no_overlap(fn, outs[i].first, outs[i].second, in.first, in.second);
    for (size_t j = i + 1; j < std::size(outs); ++j)
      check_no_overlap(fn, outs[i].first, outs[i].second, outs[j].first, outs[j].second);
  }
  const int32_t* prows = rows.is_none() ? nullptr : r.data();
  py::gil_scoped_release nogil;
  ftte::dense_backward_sgd(px, pw, pb, pdy, N, I, O, prows, R, pdx, train_bias, pvw, pvb,
                           ftte::SgdStep{lr, momentum, weight_decay});
}

}  // namespace

void register_dense(py::module_& m) {
  m.def("sgemm", &py_sgemm, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("trans_a") = false,
        py::arg("trans_b") = false, py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f,
        "c = alpha * op(a) @ op(b) + beta * c, in place (float32, C-contiguous 2-D). beta == 0 ignores c.");
  m.def("sgemm_kernel_name", &ftte::sgemm_kernel_name, "GEMM micro-kernel in use: 'avx2-fma' or 'generic'.");
  m.def(
      "sgemm_scratch_bytes",
      [](int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b, bool gather_a, bool int8_a, bool int8_b) {
        static const int32_t some_rows[1] = {0};
        static const int8_t some_q[1] = {0};
        const float* any = nullptr;
        return ftte::sgemm_scratch_bytes(
            M, N, K, ftte::GemmOperand{any, 0, trans_a, gather_a ? some_rows : nullptr, int8_a ? some_q : nullptr},
            ftte::GemmOperand{any, 0, trans_b, nullptr, int8_b ? some_q : nullptr});
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("trans_a") = false, py::arg("trans_b") = false,
      py::arg("gather_a") = false, py::arg("int8_a") = false, py::arg("int8_b") = false,
      "Packing scratch (bytes) sgemm takes for an MxNxK product with these operand layouts (int8_a/int8_b: that "
      "operand is an int8 weight with row scales, as the dense/conv kernels take them); the cost model's source.");
  m.def("dense_forward", &py_dense_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"),
        py::arg("w_scale") = py::none(), py::arg("w_trained") = py::none(), py::arg("row_slot") = py::none(),
        "y[N,O] = x[N,I] @ w[O,I]^T + b[O] (b may be None), in place. w float32, or int8 with w_scale float32 [O] "
        "(w = q * scale per row, dequantised inside the GEMM's packing), or mixed: w int8 [Q,I] frozen rows with "
        "w_scale [Q], w_trained float32 [R,I] trained rows, row_slot int32 [O] (>= 0: a w_trained row, < 0: w "
        "row ~slot).");
  m.def("dense_backward", &py_dense_backward, py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("rows"),
        py::arg("dw"), py::arg("db"), py::arg("dx"), py::arg("accumulate") = false, py::arg("w_scale") = py::none(),
        py::arg("w_trained") = py::none(), py::arg("row_slot") = py::none(),
        "w as for dense_forward (int8 or mixed allowed: w is only read for dx). Gradients for the selected output rows (int32 [R] or None = all): dw[R,I], db[R], dx[N,I] = dy @ w "
        "(each may be None). accumulate adds into dw/db; dx is always overwritten.");
  m.def("dense_backward_sgd", &py_dense_backward_sgd, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("dy"),
        py::arg("rows"), py::arg("dx"), py::arg("train_bias"), py::arg("vw"), py::arg("vb"), py::arg("lr"),
        py::arg("momentum") = 0.0f, py::arg("weight_decay") = 0.0f, py::arg("w_scale") = py::none(),
        py::arg("w_trained") = py::none(), py::arg("row_slot") = py::none(),
        "Backward and SGD update of a dense layer without gradient buffers: dx[N,I] = dy @ w (None to skip) from "
        "the weights before the update, then the bias b[O] (when train_bias) and the rows `rows` of w (unique "
        "int32 [R], None = all) updated as sgd_update_rows would from dense_backward's gradients, w's in tiles "
        "of at most 32 KiB of gradient rows. vw[R,I] / vb[O]: velocity, required when momentum != 0. A mixed w "
        "(as for dense_forward; rows = its trained rows, row_slot[rows[r]] == r): the update lands in w_trained.");
  m.def("dense_backward_sgd_scratch_bytes", &ftte::dense_backward_sgd_scratch_bytes, py::arg("N"), py::arg("I"),
        py::arg("O"), py::arg("R"), py::arg("gather"), py::arg("train_bias"), py::arg("dx"),
        py::arg("int8_weight") = false,
        "Most scratch bytes dense_backward_sgd holds for batch N, w [O,I], R trained rows (gather: a strict "
        "subset), bias and dx wanted or not, w mixed (int8_weight) or float32; the cost model's source.");
  m.def("sgd_update_rows", &py_sgd_update_rows, py::arg("param"), py::arg("rows"), py::arg("grad"),
        py::arg("velocity"), py::arg("lr"), py::arg("momentum") = 0.0f, py::arg("weight_decay") = 0.0f,
        "PyTorch-style SGD on param rows `rows` (unique int32, or None = all): g = grad + wd*param; "
        "v = momentum*v + g; param -= lr * (v if momentum else g). In place.");
}

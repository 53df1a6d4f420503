"""sgemm: NumPy reference, gathers through the dense backward, edge sizes, errors, thread and
micro-kernel independence."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ftte_core import _kernels as K

SIZES = [(1, 1, 1), (1, 7, 3), (5, 1, 9), (7, 13, 5), (6, 16, 1), (13, 33, 17), (32, 256, 64), (37, 70, 300),
         (150, 1100, 530)]


def _ref(a, b, c, ta, tb, alpha, beta):
    A = (a.T if ta else a).astype(np.float64)
    B = (b.T if tb else b).astype(np.float64)
    out = alpha * (A @ B)
    if beta != 0:
        out = out + beta * c.astype(np.float64)
    return out


@pytest.mark.parametrize("M,N,Kd", SIZES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_sgemm_matches_numpy(M, N, Kd, ta, tb):
    rng = np.random.default_rng(M * 1000 + N * 10 + Kd)
    a = rng.standard_normal((Kd, M) if ta else (M, Kd)).astype(np.float32)
    b = rng.standard_normal((N, Kd) if tb else (Kd, N)).astype(np.float32)
    for alpha, beta in [(1.0, 0.0), (1.0, 1.0), (0.5, 0.5), (-2.0, 0.25)]:
        c = rng.standard_normal((M, N)).astype(np.float32)
        expect = _ref(a, b, c, ta, tb, alpha, beta)
        K.sgemm(a, b, c, ta, tb, alpha, beta)
        np.testing.assert_allclose(c, expect, rtol=1e-4, atol=2e-6 * np.sqrt(Kd) * max(1.0, abs(alpha)) * 4)


def test_beta_zero_ignores_nan_and_k_zero():
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    c = np.full((3, 5), np.nan, np.float32)
    K.sgemm(a, b, c)
    np.testing.assert_array_equal(c, 4.0)
    # K == 0: C = beta * C (and beta == 0 clears, even NaN)
    c = np.full((3, 5), 2.0, np.float32)
    K.sgemm(np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32), c, beta=0.5)
    np.testing.assert_array_equal(c, 1.0)
    c[:] = np.nan
    K.sgemm(np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32), c)
    np.testing.assert_array_equal(c, 0.0)
    # M or N == 0: nothing to do, no crash
    K.sgemm(np.zeros((0, 4), np.float32), b, np.zeros((0, 5), np.float32))
    K.sgemm(a, np.zeros((4, 0), np.float32), np.zeros((3, 0), np.float32))


def test_sgemm_sub_view_copy_of_larger_array():
    # Bindings take C-contiguous arrays; strided operands are exercised inside the dense
    # backward (ld = O for dy^T with a gather). Here: a column block of a bigger matrix, copied.
    rng = np.random.default_rng(3)
    big = rng.standard_normal((40, 100)).astype(np.float32)
    a = np.ascontiguousarray(big[:, 13:60])
    b = rng.standard_normal((47, 29)).astype(np.float32)
    c = np.empty((40, 29), np.float32)
    K.sgemm(a, b, c)
    np.testing.assert_allclose(c, big[:, 13:60].astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


def test_sgemm_errors():
    a = np.ones((3, 4), np.float32)
    b = np.ones((4, 5), np.float32)
    c = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="sgemm: a must have dtype float32"):
        K.sgemm(a.astype(np.float64), b, c)
    with pytest.raises(ValueError, match="sgemm: b has shape"):
        K.sgemm(a, np.ones((5, 5), np.float32), c)
    with pytest.raises(ValueError, match="sgemm: b has shape"):
        K.sgemm(a, b, c, trans_b=True)
    with pytest.raises(ValueError, match="sgemm: c has shape"):
        K.sgemm(a, b, np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="sgemm: c must be C-contiguous"):
        K.sgemm(a, b, np.zeros((5, 3), np.float32).T)
    ro = np.zeros((3, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="sgemm: c must be writable"):
        K.sgemm(a, b, ro)
    with pytest.raises(ValueError, match="sgemm: a must have 2 dimensions"):
        K.sgemm(np.ones(4, np.float32), b, c)
    with pytest.raises(ValueError, match="sgemm: a must be a numpy array"):
        K.sgemm([[1.0]], b, c)
    sq = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="must not share memory"):
        K.sgemm(sq, sq, sq)


def test_thread_count_bit_identical():
    rng = np.random.default_rng(7)
    shapes = [(32, 256, 256, False, True), (256, 256, 32, True, False), (16, 6272, 72, False, False),
              (301, 1500, 700, False, False)]
    try:
        for M, N, Kd, ta, tb in shapes:
            a = rng.standard_normal((Kd, M) if ta else (M, Kd)).astype(np.float32)
            b = rng.standard_normal((N, Kd) if tb else (Kd, N)).astype(np.float32)
            c0 = rng.standard_normal((M, N)).astype(np.float32)
            outs = []
            for t in (1, 2):
                K.set_num_threads(t)
                c = c0.copy()
                K.sgemm(a, b, c, ta, tb, 0.7, 0.3)
                outs.append(c)
            np.testing.assert_array_equal(outs[0], outs[1])
    finally:
        K.set_num_threads(0)


@pytest.mark.parametrize("ta", [False, True])
def test_short_last_panel_bit_identical(ta):
    # Rows past the last multiple of the kernel's panel height (32 = 5 x 6 + 2, 16 = 2 x 6 + 4 with
    # AVX2) run through a shorter kernel; each element must be the same FMA chain as in a full panel.
    rng = np.random.default_rng(3)
    Kd, N = 70, 37
    a_full = rng.standard_normal((Kd, 36) if ta else (36, Kd)).astype(np.float32)
    b = rng.standard_normal((Kd, N)).astype(np.float32)
    want = np.zeros((36, N), np.float32)
    K.sgemm(a_full, b, want, ta, False)
    for M in (31, 32, 33, 34, 35):
        a = np.ascontiguousarray(a_full[:, :M] if ta else a_full[:M])
        got = np.full((M, N), np.nan, np.float32)
        K.sgemm(a, b, got, ta, False)
        np.testing.assert_array_equal(got, want[:M])


def test_kernel_name():
    assert K.sgemm_kernel_name() in ("avx512", "avx2-fma", "generic")


def _offset_copy(x, floats):
    """x copied to an address `floats` * 4 bytes past a 64-byte boundary (NumPy aligns to 16)."""
    buf = np.empty(x.size + 32, np.float32)
    start = (-buf.ctypes.data % 64) // 4 + floats
    out = buf[start:start + x.size].reshape(x.shape)
    out[...] = x
    return out


@pytest.mark.parametrize("Kd", [128, 300, 1024, 1500, 2100])
@pytest.mark.parametrize("M,N", [(29, 45), (31, 44), (1, 9), (2, 3), (16, 72)])
def test_dot_path_ignores_addresses(Kd, M, N):
    # The AVX-512 dot block copies B rows that are not on 64-byte boundaries into an aligned tile,
    # and chunks K (1024) whether it copies or not: the result must not depend on where A and B
    # live, bit for bit, and must match NumPy. The shapes end in blocks of 1, 2 and 3 rows of A
    # and 1-8 rows of B (its 1- and 2-row, 4- and 8-column variants).
    rng = np.random.default_rng(Kd + M)
    a = rng.standard_normal((M, Kd)).astype(np.float32)
    b = rng.standard_normal((N, Kd)).astype(np.float32)
    outs = []
    for off_a, off_b in ((0, 0), (0, 4), (3, 0), (5, 7), (8, 12)):
        c = np.full((M, N), np.nan, np.float32)
        K.sgemm(_offset_copy(a, off_a), _offset_copy(b, off_b), c, False, True)
        outs.append(c)
    np.testing.assert_allclose(outs[0], a.astype(np.float64) @ b.astype(np.float64).T, rtol=1e-4, atol=1e-4)
    for c in outs[1:]:
        np.testing.assert_array_equal(c, outs[0])


# (M, N, K, trans_a, trans_b): blocked products, and the dot path (A plain, B transposed, M <= 64,
# K >= 128) with K past one 1024-entry chunk.
_CASES = [(37, 70, 300, False, True), (13, 33, 17, True, False), (200, 90, 600, True, True),
          (5, 7, 131, False, True), (64, 3, 128, False, True), (1, 256, 257, False, True),
          (30, 21, 2500, False, True), (33, 130, 64, False, False)]

_CHILD = r"""
import numpy as np, sys
from ftte_core import _kernels as K
cases = __CASES__
rng = np.random.default_rng(11)
outs = []
for M, N, Kd, ta, tb in cases:
    a = rng.standard_normal((Kd, M) if ta else (M, Kd)).astype(np.float32)
    b = rng.standard_normal((N, Kd) if tb else (Kd, N)).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32)
    K.sgemm(a, b, c, ta, tb, 1.0, 0.5)
    outs.append(c)
scratch = [K.sgemm_scratch_bytes(M, N, Kd, ta, tb) for M, N, Kd, ta, tb in cases]
np.savez(sys.argv[1], *outs, name=K.sgemm_kernel_name(), scratch=np.array(scratch))
"""


def _kernel_results(tmp_path, kern):
    env = dict(os.environ)
    env.pop("FTTE_GEMM_KERNEL", None)
    if kern:
        env["FTTE_GEMM_KERNEL"] = kern
    out = tmp_path / f"k{kern or 'default'}.npz"
    subprocess.run([sys.executable, "-c", _CHILD.replace("__CASES__", repr(_CASES)), str(out)], env=env, check=True)
    return np.load(out)


@pytest.mark.parametrize("kern", ["generic", "avx2"])
def test_narrower_kernels_agree_with_default(tmp_path, kern):
    # FTTE_GEMM_KERNEL picks a narrower kernel than the CPU's widest: on an AVX-512 machine all
    # three kernels run here, on an AVX2 one two.
    default, other = _kernel_results(tmp_path, ""), _kernel_results(tmp_path, kern)
    want = {"generic": ("generic",), "avx2": ("avx2-fma", "generic")}[kern]
    assert str(other["name"]) in want
    if kern == "avx2" and str(default["name"]) in ("avx512", "avx2-fma"):
        assert str(other["name"]) == "avx2-fma"  # a CPU with AVX-512 has AVX2 too
    for i in range(len(_CASES)):
        x, y = default[f"arr_{i}"], other[f"arr_{i}"]
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    # The small-batch dense forward (A plain, B transposed, M <= 64, K >= 128) takes the dot path
    # on every CPU and packs nothing, so a hub on x86-64 predicts what an ARM device needs.
    for i, (M, N, Kd, ta, tb) in enumerate(_CASES):
        if not ta and tb and M <= 64 and Kd >= 128:
            assert default["scratch"][i] == other["scratch"][i] == 0, i


# The Python binding only passes C-contiguous operands without gathers; the C++ interface also
# takes ld > row length and index gathers on both operands. This harness checks every
# combination against a float64 loop, including that C's padding columns are never touched.
_HARNESS = r"""
#include "gemm.h"
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
int main() {
  std::mt19937 g(1);
  double worst = 0;
  auto u = [&] { return (g() % 2001) / 1000.0f - 1.0f; };
  for (int it = 0; it < 300; ++it) {
    int M = 1 + g() % 40, N = 1 + g() % 70, K = g() % 300;
    if (it % 50 == 0) { M = 1 + g() % 300; N = 1 + g() % 1200; K = 1 + g() % 600; }
    if (it % 50 == 25) { M = 1 + g() % 64; N = 1 + g() % 40; K = 1000 + g() % 1200; }  // dot path, K in chunks
    bool ta = g() % 2, tb = g() % 2, ia = g() % 2, ib = g() % 2;
    int pad = g() % 3, SA = M + 3, SB = N + 2, am = ia ? SA : M, bn = ib ? SB : N;
    long lda = (ta ? am : K) + pad, ldb = (tb ? K : bn) + pad, ldc = N + pad;
    std::vector<float> A((ta ? K : am) * (size_t)lda), B((tb ? bn : K) * (size_t)ldb), C((size_t)M * ldc);
    for (auto& v : A) v = u();
    for (auto& v : B) v = u();
    for (auto& v : C) v = u();
    std::vector<int32_t> ixa(M), ixb(N);
    for (auto& v : ixa) v = g() % SA;
    for (auto& v : ixb) v = g() % SB;
    float alpha = 0.5f, beta = it % 3 == 0 ? 0.f : (it % 3 == 1 ? 1.f : 0.25f);
    std::vector<float> R = C;
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        double s = 0;
        int r = ia ? ixa[i] : i, c = ib ? ixb[j] : j;
        for (int k = 0; k < K; ++k)
          s += double(ta ? A[k * lda + r] : A[r * lda + k]) * double(tb ? B[c * ldb + k] : B[k * ldb + c]);
        R[i * ldc + j] = float(alpha * s + (beta == 0 ? 0.0 : beta * double(C[i * ldc + j])));
      }
    ftte::sgemm(M, N, K, alpha, {A.data(), lda, ta, ia ? ixa.data() : nullptr},
                {B.data(), ldb, tb, ib ? ixb.data() : nullptr}, beta, C.data(), ldc);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < ldc; ++j) {
        double e = std::fabs(double(C[i * ldc + j]) - double(R[i * ldc + j]));
        if (j >= N && e != 0) { std::printf("padding clobbered\n"); return 1; }
        worst = std::max(worst, e / std::sqrt(K + 1.0));
      }
  }
  std::printf("%g\n", worst);
  return worst < 2e-6 ? 0 : 1;
}
"""


@pytest.mark.parametrize("kernel", ["default", "avx2", "generic", "generic-8x12", "generic-4x4"])
def test_cpp_strided_and_gathered_operands(tmp_path, kernel):
    # default: the widest x86 kernel the CPU runs; avx2: the AVX2 one forced on an AVX-512 CPU.
    # generic-8x12 is the aarch64 shape, 4x4 an odd one: both run here through the override.
    import platform
    import shutil

    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    x86 = platform.machine() in ("x86_64", "AMD64")
    if kernel == "avx2" and not x86:
        pytest.skip("x86-64 kernels")
    root = os.path.join(os.path.dirname(__file__), "..")
    csrc = os.path.join(root, "csrc")
    src = tmp_path / "harness.cpp"
    src.write_text(_HARNESS)
    exe = tmp_path / "harness"
    cmd = [cxx, "-std=c++17", "-O2", "-I", csrc, str(src)] + [
        os.path.join(csrc, f) for f in ("gemm.cpp", "parallel.cpp", "workspace.cpp")]
    if kernel in ("default", "avx2") and x86:
        for name, flags in (("gemm_avx2", ["-mavx2", "-mfma"]), ("gemm_avx512", ["-mavx512f", "-mfma"])):
            obj = tmp_path / f"{name}.o"
            subprocess.run([cxx, "-std=c++17", "-O2", *flags, "-DFTTE_HAVE_AVX2_KERNEL=1", "-I", csrc, "-c",
                            os.path.join(csrc, f"{name}.cpp"), "-o", str(obj)], check=True)
            cmd.append(str(obj))
        cmd.append("-DFTTE_HAVE_AVX2_KERNEL=1")
    if kernel == "generic-8x12":
        cmd += ["-DFTTE_GEMM_GENERIC_MR=8", "-DFTTE_GEMM_GENERIC_NV=3"]
    if kernel == "generic-4x4":
        cmd += ["-DFTTE_GEMM_GENERIC_MR=4", "-DFTTE_GEMM_GENERIC_NV=1"]
    subprocess.run(cmd + ["-o", str(exe), "-pthread"], check=True)
    env = dict(os.environ)
    env.pop("FTTE_GEMM_KERNEL", None)
    if kernel == "avx2":
        env["FTTE_GEMM_KERNEL"] = "avx2"
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr

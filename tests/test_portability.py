"""The kernels compile for the Pi's architectures with Debian's cross compilers.

Each C++ kernel source (everything but the Python bindings) is compiled for aarch64 and for
armv7 hard-float with and without NEON, with the same warnings-as-errors flags, and linked into
a small static program so undefined symbols show up too. Missing cross compilers skip the test
unless FTTE_REQUIRE_CROSS=1 (CI installs them and sets it).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TARGETS = {
    "aarch64": ("aarch64-linux-gnu-g++", ["-march=armv8-a"]),
    "armv7-neon": ("arm-linux-gnueabihf-g++", ["-march=armv7-a", "-mfpu=neon-vfpv4", "-mfloat-abi=hard"]),
    "armv7-vfp": ("arm-linux-gnueabihf-g++", ["-march=armv7-a", "-mfpu=vfpv3-d16", "-mfloat-abi=hard"]),
}

MAIN = r"""
#include "gemm.h"
#include "parallel.h"
#include <cstdio>
int main() {
  float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, 0, 1, 1, 1}, c[4] = {0, 0, 0, 0};
  ftte::sgemm(2, 2, 3, 1.f, {a, 3}, {b, 2}, 0.f, c, 2);
  std::printf("%g %g %g %g %d\n", c[0], c[1], c[2], c[3], ftte::get_num_threads());
  return 0;
}
"""


def kernel_sources():
    text = (ROOT / "CMakeLists.txt").read_text()
    block = re.search(r"set\(FTTE_KERNEL_SOURCES(.*?)\)", text, re.S).group(1)
    return [ROOT / s for s in block.split()]


@pytest.mark.parametrize("target", TARGETS)
def test_kernels_cross_compile(target, tmp_path):
    compiler, flags = TARGETS[target]
    if shutil.which(compiler) is None:
        if os.environ.get("FTTE_REQUIRE_CROSS") == "1":
            pytest.fail(f"{compiler} is required (FTTE_REQUIRE_CROSS=1) but not installed")
        pytest.skip(f"{compiler} not installed (apt-get install g++-aarch64-linux-gnu g++-arm-linux-gnueabihf)")
    main = tmp_path / "main.cpp"
    main.write_text(MAIN)
    sources = kernel_sources() + [main]
    cmd = [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-static",
           *flags, f"-I{ROOT / 'csrc'}", *map(str, sources), "-o", str(tmp_path / "probe")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "probe").stat().st_size > 0

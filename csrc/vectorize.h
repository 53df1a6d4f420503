#pragma once

// Hot loops are compiled twice on x86-64 (AVX2/FMA "x86-64-v3" and the SSE2 baseline) and the
// loader picks one at run time, so one wheel is fast on new CPUs and still runs on old ones.
// Only GCC on x86-64 gets this: aarch64/armv7 g++ 12 has no target_clones and -O3 already uses
// NEON there; clang's spelling differs, so it just gets the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FTTE_NO_TARGET_CLONES)
#define FTTE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FTTE_VECTOR_CLONES
#endif

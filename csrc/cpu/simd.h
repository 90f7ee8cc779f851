// The extension is compiled for baseline x86-64 (SSE2). Functions marked with this are
// cloned for AVX2 and AVX-512 too, and the loader picks the widest the CPU has, as
// torch's own kernels do with their per-ISA builds.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define AL_EXT_CLONE_FOR_WIDE_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AL_EXT_CLONE_FOR_WIDE_SIMD
#endif

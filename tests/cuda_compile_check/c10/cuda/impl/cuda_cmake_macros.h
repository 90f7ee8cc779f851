#pragma once
// Stand-in for the header that CUDA builds of torch generate (CPU wheels lack it), so
// that the CUDA glue can be compile-checked on a machine with a CPU-only torch. It holds
// the one definition a CUDA build of torch 2.x puts there.
#define C10_CUDA_BUILD_SHARED_LIBS

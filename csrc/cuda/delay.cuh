// A kernel that only waits: it holds a stream for a set time, so that a test can make a
// producer late on purpose and a consumer that forgot to wait for it read wrong data every time.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace al_ext::cuda {

cudaError_t launch_delay(int64_t nanoseconds, cudaStream_t stream);

}  // namespace al_ext::cuda

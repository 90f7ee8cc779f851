// Keeps large CPU buffers for reuse while training runs.
//
// A training step frees and allocates the same large tensors every batch (a wide bridge's
// weight gradient, its bfloat16 copy under autocast). glibc's malloc hands allocations above
// its mmap threshold (32 MiB at most, and any size that does not fit a thread's 64 MiB heap)
// back to the kernel when freed, and the next step's allocation faults in fresh pages that the
// kernel zero-fills: ALCNN's first block spent 30 of its 70 ms a step there (bf16, one
// thread; benchmarks/RESULTS.md). This allocator wraps torch's CPU allocator and, while at
// least one user has enabled it, keeps each freed buffer of at least kMinBytes for the next
// request of the same size, as the CUDA caching allocator does on a GPU. Disabled, it passes
// every request straight to the allocator it wraps.
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>

namespace al_ext {

struct LargeBufferCacheStats {
  int64_t users = 0;           // enable() calls not yet matched by disable()
  int64_t kept_bytes = 0;      // freed buffers held for reuse
  int64_t lent_bytes = 0;      // buffers handed out through the cache and not yet freed
  int64_t reused = 0;          // requests served from kept buffers, since the process started
  int64_t max_kept_bytes = 0;  // the most it keeps; a buffer freed beyond it goes back to the system
};

// Installs the cache as torch's CPU allocator (once), and counts one more user: from now until
// the matching disable(), freed buffers of at least kMinBytes are kept for reuse.
void enable_large_buffer_cache();
// One user fewer; the last one gives every kept buffer back to the system.
void disable_large_buffer_cache();
// The most bytes kept at once (0 keeps nothing, the same as never enabling).
void set_large_buffer_cache_limit(int64_t max_kept_bytes);
LargeBufferCacheStats large_buffer_cache_stats();

// Smaller buffers come from malloc's own heaps, which it does reuse.
constexpr size_t kLargeBufferMinBytes = size_t{1} << 20;

}  // namespace al_ext

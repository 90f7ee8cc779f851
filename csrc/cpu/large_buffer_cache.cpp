#include "large_buffer_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace al_ext {
namespace {

class LargeBufferCache final : public c10::Allocator {
 public:
  // Never destroyed: tensors freed during interpreter shutdown still call its deleter.
  static LargeBufferCache& instance() {
    static auto* cache = new LargeBufferCache();
    return *cache;
  }

  void enable() {
    std::call_once(installed_, [this] {
      base_ = c10::GetCPUAllocator();
      // The highest priority: an allocator set later with a lower one must not displace it
      // while buffers it lent are alive (their deleter is this allocator's either way).
      c10::SetCPUAllocator(this, /*priority=*/UINT8_MAX);
      // A process forked while another thread holds the lock (a DataLoader starting its
      // workers during a pipelined run) would inherit it held, and its first large
      // allocation would wait forever: fork waits for the lock, and both sides let it go.
      // The child (a worker, not a training run) keeps nothing: its buffers go back when
      // freed. What the parent kept stays unused in it, shared with the parent until written.
      // Its count of open blocks stays, so that a block it inherited open closes normally.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] {
                       instance().forked_child_ = true;
                       instance().mutex_.unlock();
                     });
    });
    std::lock_guard<std::mutex> lock(mutex_);
    ++users_;
  }

  void disable() {
    std::vector<c10::DataPtr> released;  // freed after the lock is let go
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(users_ > 0, "al_ext: the large-buffer cache was disabled more often than enabled");
      if (--users_ == 0) released = take_kept_locked();
    }
  }

  void set_limit(int64_t max_kept_bytes) {
    TORCH_CHECK_VALUE(max_kept_bytes >= 0, "max_kept_bytes must be >= 0, got ", max_kept_bytes);
    std::vector<c10::DataPtr> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      max_kept_bytes_ = static_cast<size_t>(max_kept_bytes);
      if (kept_bytes_ > max_kept_bytes_) released = take_kept_locked();
    }
  }

  LargeBufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t lent_bytes = 0;
    for (const auto& [data, buffer] : lent_) lent_bytes += buffer.bytes;
    return {users_, static_cast<int64_t>(kept_bytes_), static_cast<int64_t>(lent_bytes), reused_,
            static_cast<int64_t>(max_kept_bytes_)};
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kLargeBufferMinBytes) return base_->allocate(n);
    c10::DataPtr buffer;
    bool reusing = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      reusing = keeping_locked();
      auto kept = reusing ? kept_.find(n) : kept_.end();
      if (kept != kept_.end()) {
        buffer = std::move(kept->second);
        kept_.erase(kept);
        kept_bytes_ -= n;
        ++reused_;
      }
    }
    if (!reusing) return base_->allocate(n);  // torch's own buffer, freed by its own deleter
    if (!buffer) buffer = base_->allocate(n);
    void* data = buffer.get();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      lent_.emplace(data, Lent{std::move(buffer), n});
    }
    // The data pointer is its own context, as torch's allocators keep it (raw_allocate needs it).
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Lent {
    c10::DataPtr base;  // the wrapped allocator's buffer, freed with it
    size_t bytes;
  };

  // The deleter of every buffer lent through the cache, and the raw deleter, which may also
  // be handed a buffer that the wrapped allocator gave out while the cache was disabled.
  static void release(void* data) {
    LargeBufferCache& cache = instance();
    c10::DataPtr freed;  // destroyed (given back to the system) after the lock is let go
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      auto lent = cache.lent_.find(data);
      if (lent == cache.lent_.end()) {
        c10::DeleterFnPtr base_deleter = cache.base_->raw_deleter();
        TORCH_INTERNAL_ASSERT(base_deleter, "al_ext: a CPU buffer to free that no allocator can free");
        base_deleter(data);
        return;
      }
      Lent buffer = std::move(lent->second);
      cache.lent_.erase(lent);
      if (cache.keeping_locked() && cache.kept_bytes_ + buffer.bytes <= cache.max_kept_bytes_) {
        cache.kept_bytes_ += buffer.bytes;
        cache.kept_.emplace(buffer.bytes, std::move(buffer.base));
      } else {
        freed = std::move(buffer.base);
      }
    }
  }

  bool keeping_locked() const { return users_ > 0 && !forked_child_; }

  std::vector<c10::DataPtr> take_kept_locked() {
    std::vector<c10::DataPtr> taken;
    taken.reserve(kept_.size());
    for (auto& [bytes, buffer] : kept_) taken.push_back(std::move(buffer));
    kept_.clear();
    kept_bytes_ = 0;
    return taken;
  }

  std::once_flag installed_;
  c10::Allocator* base_ = nullptr;
  std::mutex mutex_;
  int64_t users_ = 0;
  bool forked_child_ = false;  // this process is a fork of one that enabled the cache
  int64_t reused_ = 0;
  size_t kept_bytes_ = 0;
  size_t max_kept_bytes_ = size_t{2} << 30;  // 2 GiB: a step's worth of large buffers, bounded
  std::unordered_map<void*, Lent> lent_;
  std::unordered_multimap<size_t, c10::DataPtr> kept_;
};

}  // namespace

void enable_large_buffer_cache() { LargeBufferCache::instance().enable(); }
void disable_large_buffer_cache() { LargeBufferCache::instance().disable(); }
void set_large_buffer_cache_limit(int64_t max_kept_bytes) { LargeBufferCache::instance().set_limit(max_kept_bytes); }
LargeBufferCacheStats large_buffer_cache_stats() { return LargeBufferCache::instance().stats(); }

}  // namespace al_ext

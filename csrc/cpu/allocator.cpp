// The output cache of cpu/allocator.h: a c10::Allocator that keeps freed blocks in a free list keyed by size.
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include "cpu/allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <pthread.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace pyengine_shared {
namespace cpu {
namespace {

// Below this, a fault costs at most 16 pages and the lock would be most of the cost. From here up glibc's heap
// does not reliably recycle freed memory: once a process holds long-lived tensors (a model, a dataset), its
// freed outputs of a few hundred KB sit at the top of the heap and are trimmed back to the system on free, so
// the next call faults them in again (FusedMLP 4096x32->64->64->1 in bfloat16, forward+backward: ~500 faults
// of ~3 us a step; benchmarks/NOTES.md, "Outputs of 64 KiB and up from the cache").
constexpr size_t kMinBlockBytes = size_t{64} << 10;
// Blocks of 1 MiB and up are aligned to and sized in whole transparent huge pages. The huge-page hint covers the
// whole huge pages of the first request a block serves: past them, the last part of a huge page the output does
// not fill stays in 4 KB pages, so the process's resident memory counts the output's bytes (a 125 MiB gradient
// is not 126 MiB). Smaller blocks are page aligned and sized in steps of kSmallBlockStep, so that requests a
// little apart share blocks.
constexpr size_t kHugeBlockBytes = size_t{1} << 20;
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kSmallBlockStep = size_t{64} << 10;
constexpr size_t kPage = size_t{4} << 10;
// Holds two 500 MiB cross_entropy gradients (4096x32000 float32) or sixteen 64 MB activations.
constexpr size_t kDefaultLimit = size_t{1} << 30;
constexpr const char* kLimitVariable = "PYENGINE_CPU_CACHE_BYTES";

size_t round_up(size_t n, size_t step) { return (n + step - 1) / step * step; }

size_t block_size_for(size_t n) { return n >= kHugeBlockBytes ? round_up(n, kHugePage) : round_up(n, kSmallBlockStep); }

// A hint: pages already faulted in and kernels without THP ignore it.
void advise_huge_pages(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t at = reinterpret_cast<uintptr_t>(p);
  const uintptr_t begin = (at + kHugePage - 1) & ~(kHugePage - 1), end = (at + n) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

size_t limit_from_environment() {
  const char* text = std::getenv(kLimitVariable);
  if (text == nullptr || *text == '\0') return kDefaultLimit;
  errno = 0;
  char* end = nullptr;
  const unsigned long long count = std::isdigit(static_cast<unsigned char>(*text)) ? std::strtoull(text, &end, 10) : 0;
  size_t scale = 1;
  if (end != nullptr && *end != '\0') {
    switch (std::toupper(static_cast<unsigned char>(*end++))) {
      case 'K': scale = size_t{1} << 10; break;
      case 'M': scale = size_t{1} << 20; break;
      case 'G': scale = size_t{1} << 30; break;
      default: scale = 0;
    }
  }
  TORCH_CHECK(end != nullptr && *end == '\0' && errno == 0 && scale != 0 &&
                  count <= std::numeric_limits<size_t>::max() / scale,
              kLimitVariable, " must be a byte count such as 1073741824 or 1G (0 turns pyengine's CPU output cache ",
              "off), got '", text, "'");
  return static_cast<size_t>(count) * scale;
}

class OutputCache final : public c10::Allocator {
 public:
  // Leaked on purpose: tensors freed during static destruction (or by another thread at exit) still find it.
  static OutputCache& instance() {
    static OutputCache* cache = [] {
      the_cache = new OutputCache(limit_from_environment());
      // A fork while another thread holds the lock would leave the child's copy locked for ever (DataLoader
      // workers are forked): take it around the fork, so both sides start with it free.
      pthread_atfork([] { the_cache->mutex_.lock(); }, [] { the_cache->mutex_.unlock(); },
                     [] { the_cache->mutex_.unlock(); });
      return the_cache;
    }();
    return *cache;
  }

  bool enabled() const { return limit_.load(std::memory_order_relaxed) > 0; }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBlockBytes || !enabled()) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t size = block_size_for(n);
    size_t block_size = size;
    void* block = take_cached(size, block_size);
    if (block == nullptr) block = fresh_block(size, n);
    mark_in_use(block, block_size);
    return {block, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  OutputCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {as_int(cached_bytes_), as_int(free_.size()), as_int(in_use_bytes_), as_int(live_.size()),
            as_int(hits_),        as_int(misses_),       as_int(limit_.load())};
  }

  void set_limit(size_t limit) {
    limit_.store(limit);
    evict_down_to(limit);
  }

  void empty() { evict_down_to(0); }

 private:
  struct Kept {
    void* block;
    uint64_t freed_at;  // for evicting the least recently freed first
  };

  explicit OutputCache(size_t limit) : limit_(limit) {}

  static int64_t as_int(size_t v) { return static_cast<int64_t>(v); }

  void evict_down_to(size_t cached_at_most) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_oldest_until(cached_at_most, evicted);
    }
    for (void* p : evicted) std::free(p);
  }

  // Best fit, within an eighth of the request: a 64 MB output must not pin a 1 GB block. Among blocks of that
  // size the most recently freed, whose pages may still be in the CPU caches.
  void* take_cached(size_t size, size_t& block_size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto fit = free_.lower_bound(size);
    if (fit == free_.end() || fit->first > size + size / 8) {
      ++misses_;
      return nullptr;
    }
    const auto newest = std::prev(free_.upper_bound(fit->first));
    void* block = newest->second.block;
    block_size = newest->first;
    free_.erase(newest);
    cached_bytes_ -= block_size;
    ++hits_;
    return block;
  }

  void mark_in_use(void* block, size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_.emplace(block, size);
    in_use_bytes_ += size;
    report_to_profiler(block, static_cast<int64_t>(size));
  }

  // As torch's default CPU allocator does, so that torch.profiler(profile_memory=True) sees these outputs.
  // Caller holds mutex_, so a block's release is reported before another thread's reuse of it.
  void report_to_profiler(void* block, int64_t delta) const {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(block, delta, in_use_bytes_, in_use_bytes_ + cached_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
  }

  void* fresh_block(size_t size, size_t used) {
    void* block = nullptr;
    const size_t alignment = size >= kHugeBlockBytes ? kHugePage : kPage;
    bool ok = posix_memalign(&block, alignment, size) == 0;
    if (!ok) {
      empty();  // what the cache holds may be what the system lacks
      ok = posix_memalign(&block, alignment, size) == 0;
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ok, "pyengine: out of memory allocating a CPU output of ", size, " bytes (",
                     info().in_use_bytes, " bytes held by live pyengine outputs). Free some tensors, or use smaller ",
                     "batches.");
    advise_huge_pages(block, used);
    return block;
  }

  static void give_back(void* block) { instance().release(block); }

  void release(void* block) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = live_.find(block);
      if (it == live_.end()) {  // a small block that raw_allocate had from the default allocator
        c10::GetDefaultCPUAllocator()->raw_deleter()(block);
        return;
      }
      const size_t size = it->second, limit = limit_.load();
      live_.erase(it);
      in_use_bytes_ -= size;
      if (size > limit) {
        to_free.push_back(block);
      } else {
        evict_oldest_until(limit - size, to_free);
        free_.emplace(size, Kept{block, ++clock_});
        cached_bytes_ += size;
      }
      report_to_profiler(block, -static_cast<int64_t>(size));
    }
    // Outside the lock: the munmap of a large block takes a while.
    for (void* p : to_free) std::free(p);
  }

  // Caller holds mutex_. The blocks to free are handed out, to be freed after the lock is released.
  void evict_oldest_until(size_t cached_at_most, std::vector<void*>& evicted) {
    if (cached_at_most == 0) {  // everything: no need to look for the oldest each time
      for (const auto& entry : free_) evicted.push_back(entry.second.block);
      free_.clear();
      cached_bytes_ = 0;
      return;
    }
    while (cached_bytes_ > cached_at_most) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.freed_at < oldest->second.freed_at) oldest = it;
      evicted.push_back(oldest->second.block);
      cached_bytes_ -= oldest->first;
      free_.erase(oldest);
    }
  }

  static inline OutputCache* the_cache = nullptr;  // for the fork handlers, which cannot capture

  std::mutex mutex_;
  std::atomic<size_t> limit_;
  std::multimap<size_t, Kept> free_;          // kept blocks by size
  std::unordered_map<void*, size_t> live_;    // blocks held by tensors, and their sizes
  size_t cached_bytes_ = 0, in_use_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, clock_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  OutputCache& cache = OutputCache::instance();
  at::detail::check_size_nonnegative(shape);
  const size_t nbytes = at::detail::computeStorageNbytesContiguous(shape, options.dtype().itemsize());
  if (!cache.enabled() || nbytes < kMinBlockBytes || !options.device().is_cpu() ||
      options.layout() != at::kStrided) {
    at::Tensor t = at::empty(shape, options);
    advise_huge_pages(t.data_ptr(), t.nbytes());  // no cache: at least fault a fresh buffer in 2 MB at a time
    return t;
  }
  return at::detail::empty_generic(shape, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), options.memory_format_opt());
}

OutputCacheInfo output_cache_info() { return OutputCache::instance().info(); }

void empty_output_cache() { OutputCache::instance().empty(); }

void set_output_cache_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "the CPU output cache limit must be a byte count >= 0 (0 turns the cache off), got ",
                    bytes);
  OutputCache::instance().set_limit(static_cast<size_t>(bytes));
}

}  // namespace cpu
}  // namespace pyengine_shared

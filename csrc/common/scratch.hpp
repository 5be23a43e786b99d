// Per-thread scratch memory for kernels, reused from call to call. Kernels called thousands of times per second
// (each step of a training loop, each product of an eigensolver) would otherwise allocate their buffers anew every
// time, and buffers of a few hundred KiB come from mmap: fresh pages, a page fault and a zero fill per page.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace physai {

// Buffers up to this size are kept for the next call; larger ones are freed when released. The kernels' tiles keep
// their buffers under it (16 MiB of float, 32 MiB of double: schedule.hpp's kTileValues), while a buffer that
// grows with the batch (the drop-in's dZ of all n rows, for dX) would otherwise hold memory of the largest call
// ever made, on every thread, until the process ends; at this size the page faults of a fresh buffer cost little
// against the work that fills it.
constexpr size_t kRetainedScratchBytes = size_t(64) << 20;

// A stack of buffers per thread: the buffer at depth i is kept and grown as needed (up to kRetainedScratchBytes),
// so a repeated call pattern reuses the same memory. Buffers are released in the reverse order of their requests,
// which scoped Scratch objects guarantee.
class ScratchStack {
 public:
  static ScratchStack& local() {
    thread_local ScratchStack stack;
    return stack;
  }
  void* push(size_t bytes) {
    if (depth_ == slots_.size()) slots_.emplace_back();
    Slot& slot = slots_[depth_++];
    if (slot.bytes < bytes) {
      slot.data.reset(new std::byte[bytes]);
      slot.bytes = bytes;
    }
    return slot.data.get();
  }
  void pop() {
    Slot& slot = slots_[--depth_];
    if (slot.bytes > kRetainedScratchBytes) slot = Slot();
  }
  // Bytes held by this thread's buffers (a test's view of what stays resident between calls).
  size_t retained_bytes() const {
    size_t total = 0;
    for (const Slot& slot : slots_) total += slot.bytes;
    return total;
  }

 private:
  struct Slot {
    std::unique_ptr<std::byte[]> data;
    size_t bytes = 0;
  };
  std::vector<Slot> slots_;
  size_t depth_ = 0;
};

// count uninitialised values of T (every kernel writes its scratch before reading it), held for the enclosing scope
// of the thread that asked for them.
template <class T>
class Scratch {
 public:
  explicit Scratch(int64_t count) : data_(static_cast<T*>(ScratchStack::local().push(size_t(count) * sizeof(T)))) {}
  ~Scratch() { ScratchStack::local().pop(); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return data_; }
  T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_;
};

}  // namespace physai

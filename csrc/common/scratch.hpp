// Per-thread scratch memory for kernels, reused from call to call. Kernels called thousands of times per second
// (each step of a training loop, each product of an eigensolver) would otherwise allocate their buffers anew every
// time, and buffers of a few hundred KiB come from mmap: fresh pages, a page fault and a zero fill per page.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace physai {

// A stack of buffers per thread: the buffer at depth i is kept and grown as needed, never shrunk, so a repeated
// call pattern reuses the same memory. Buffers are released in the reverse order of their requests, which scoped
// Scratch objects guarantee.
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
  void pop() { --depth_; }

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

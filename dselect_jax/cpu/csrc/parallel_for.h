// ParallelFor: the CPU kernels' way of splitting work over XLA's CPU
// thread pool (bn_relu_pool.cc, toeplitz_rows.cc).

#ifndef DSELECT_JAX_CPU_PARALLEL_FOR_H_
#define DSELECT_JAX_CPU_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace dselect_cpu {

// Runs f(chunk) for chunk in [0, n_chunks) on the calling thread and the
// pool's. The caller claims chunks too and waits only for chunks that other
// threads have started, so it cannot wait on a task still in the queue (the
// pool's threads may all be inside such calls).
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n_chunks,
                        const std::function<void(int64_t)>& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // Claims and runs chunks until none is left.
  auto work = [state, n_chunks](const std::function<void(int64_t)>& fn) {
    for (int64_t i; (i = state->next.fetch_add(1)) < n_chunks;) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n_chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers =
      std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n_chunks) - 1;
  // A helper that starts after every chunk was claimed touches only state,
  // never f (which lives in the caller's frame).
  auto shared_f = std::make_shared<std::function<void(int64_t)>>(f);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, work, shared_f, n_chunks] {
      if (state->next.load() < n_chunks) work(*shared_f);
    });
  }
  work(f);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n_chunks; });
}


// The chunks of `chunk` items that cover n items.
inline int64_t NumChunks(int64_t n, int64_t chunk) {
  return (n + chunk - 1) / chunk;
}

}  // namespace dselect_cpu

#endif  // DSELECT_JAX_CPU_PARALLEL_FOR_H_

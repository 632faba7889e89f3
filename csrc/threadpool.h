// One persistent pool of worker threads that every parallel kernel call shares.
//
// Compiled with baseline flags. The pool is made on first use with one thread per core the
// process may run on (set_num_threads changes that); the calling thread is always worker 0, so
// n threads means n - 1 helpers. Helpers spin briefly after each job, so the next op of a decode
// step starts without a wake-up, then sleep on a condition variable. When its helpers are not
// getting a core (another busy process), the pool runs jobs on the caller alone for a while
// (see threadpool.cpp).
#pragma once

#include <cstdint>
#include <functional>

namespace lfm {

// Threads that parallel_for uses from now on (>= 1); joins and recreates the helpers.
void set_num_threads(int n);
int num_threads();

// How often a job waited for a helper that was not running (stalls), and how many jobs ran on
// the calling thread alone because of that (solo_jobs), since the pool was made.
struct PoolStats {
    int64_t stalls;
    int64_t solo_jobs;
};
PoolStats pool_stats();

// Calls body(begin, end) on disjoint chunks covering [0, n_tasks), spread over the pool's
// threads (the caller included), and returns when every chunk is done. Chunks hand out `grain`
// tasks at a time (0: about n_tasks / (4 * threads)). Which thread runs a chunk never changes
// a result: every task must write only its own outputs. Calls from several Python threads are
// serialised; body must not call parallel_for itself.
void parallel_for(int64_t n_tasks, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

}  // namespace lfm

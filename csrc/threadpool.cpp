// The persistent thread pool behind parallel_for (see threadpool.h). Baseline flags.
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <new>
#include <mutex>
#include <thread>
#include <vector>

namespace lfm {
namespace {

// How long an idle helper spins before it sleeps: longer than the Python work between two
// kernels of a decode step (tens of microseconds), short enough not to burn a core for long.
constexpr auto kSpinTime = std::chrono::microseconds(2000);

// Another busy process can take a helper's core. The caller then finishes its own share and
// waits for a helper that is not running: a whole scheduler time slice (milliseconds) per job,
// and a spinning helper competes with the caller for the one core left. Measured on a 2-core
// machine with one busy process beside it, decode fell to half of what one thread gives. So a
// job whose caller waited for stragglers longer than it worked, and longer than kStallTime,
// counts as stalled; after a stall the pool runs every job on the caller alone (its helpers
// fall asleep) for a quiet period, then tries its helpers again. The period doubles while the
// stalls go on (up to kMaxSolo) and falls back to kMinSolo after kCleanJobs jobs without one.
constexpr auto kStallTime = std::chrono::microseconds(300);
constexpr auto kMinSolo = std::chrono::milliseconds(25);
constexpr auto kMaxSolo = std::chrono::milliseconds(1600);
constexpr int kCleanJobs = 256;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

int default_threads() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}

class Pool {
   public:
    explicit Pool(int n_threads) : n_threads_(n_threads) {
        for (int i = 1; i < n_threads_; ++i) helpers_.emplace_back([this] { helper_loop(); });
    }

    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            stop_ = true;
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        for (std::thread& t : helpers_) t.join();
    }

    int n_threads() const { return n_threads_; }

    void run(int64_t n_tasks, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
        if (n_tasks <= 0) return;
        if (grain <= 0) grain = std::max<int64_t>(1, n_tasks / (4 * n_threads_));
        if (n_threads_ == 1 || n_tasks <= grain) {
            body(0, n_tasks);
            return;
        }
        using Clock = std::chrono::steady_clock;
        const Clock::time_point start = Clock::now();
        if (start < solo_until_) {
            ++solo_jobs_;
            body(0, n_tasks);
            return;
        }
        body_ = &body;
        n_tasks_ = n_tasks;
        grain_ = grain;
        next_.store(0, std::memory_order_relaxed);
        busy_.store(static_cast<int>(helpers_.size()), std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(sleep_mutex_);  // no lost wake-up: see helper_loop
            generation_.fetch_add(1, std::memory_order_release);
        }
        // Sleeping helpers take a wake-up (tens to hundreds of microseconds on a VM) to join:
        // waiting for them then is not a stall.
        const bool woke_sleepers = sleepers_.load(std::memory_order_acquire) > 0;
        if (woke_sleepers) wake_.notify_all();
        work();
        const Clock::time_point own_done = Clock::now();
        // A helper that the OS took off its core (more runnable threads than cores) would
        // otherwise keep us spinning for a whole time slice.
        for (uint32_t spins = 0; busy_.load(std::memory_order_acquire) != 0; ++spins) {
            if (spins < 4096) {
                cpu_relax();
            } else {
                std::this_thread::yield();
            }
        }
        body_ = nullptr;
        const Clock::time_point end = Clock::now();
        const auto waited = end - own_done;
        if (!woke_sleepers && waited > kStallTime && waited > own_done - start) {
            ++stalls_;
            solo_period_ = clean_jobs_ < kCleanJobs ? std::min<std::chrono::steady_clock::duration>(2 * solo_period_, kMaxSolo)
                                                    : kMinSolo;
            clean_jobs_ = 0;
            solo_until_ = end + solo_period_;
        } else {
            ++clean_jobs_;
        }
    }

    PoolStats stats() const { return {stalls_, solo_jobs_}; }

   private:
    void work() {
        for (;;) {
            const int64_t begin = next_.fetch_add(grain_, std::memory_order_relaxed);
            if (begin >= n_tasks_) return;
            (*body_)(begin, std::min(begin + grain_, n_tasks_));
        }
    }

    void helper_loop() {
        uint64_t seen = 0;
        for (;;) {
            const auto spin_start = std::chrono::steady_clock::now();
            uint32_t spins = 0;
            while (generation_.load(std::memory_order_acquire) == seen) {
                cpu_relax();
                if ((++spins & 255) == 0) std::this_thread::yield();  // let a waiting thread run
                if ((spins & 255) == 0 &&
                    std::chrono::steady_clock::now() - spin_start > kSpinTime) {
                    std::unique_lock<std::mutex> lock(sleep_mutex_);
                    sleepers_.fetch_add(1, std::memory_order_acq_rel);
                    wake_.wait(lock, [&] {
                        return generation_.load(std::memory_order_acquire) != seen;
                    });
                    sleepers_.fetch_sub(1, std::memory_order_acq_rel);
                }
            }
            seen = generation_.load(std::memory_order_acquire);
            if (stop_) return;
            work();
            busy_.fetch_sub(1, std::memory_order_release);
        }
    }

    const int n_threads_;
    std::vector<std::thread> helpers_;
    std::atomic<uint64_t> generation_{0};  // bumped once per job
    std::atomic<int64_t> next_{0};         // the next unclaimed task
    std::atomic<int> busy_{0};             // helpers still inside the current job
    std::atomic<int> sleepers_{0};
    std::mutex sleep_mutex_;
    std::condition_variable wake_;
    bool stop_ = false;
    const std::function<void(int64_t, int64_t)>* body_ = nullptr;
    int64_t n_tasks_ = 0;
    int64_t grain_ = 1;
    // Stall tracking; only the calling thread (under pool_mutex) touches these.
    std::chrono::steady_clock::time_point solo_until_{};
    std::chrono::steady_clock::duration solo_period_ = kMinSolo;
    int clean_jobs_ = kCleanJobs;
    int64_t stalls_ = 0;
    int64_t solo_jobs_ = 0;
};

std::mutex& pool_mutex() {  // one job at a time, and no resize during one
    static std::mutex m;
    return m;
}

std::unique_ptr<Pool>& pool_slot() {
    static std::unique_ptr<Pool> pool;
    return pool;
}

// A forked child has none of the parent's helper threads: it forgets the pool (leaking it, as
// its threads are not there to join) and makes a new one on first use.
void forget_pool_in_child() {
    new (&pool_mutex()) std::mutex();
    pool_slot().release();
}

Pool& pool_locked() {
    static const bool registered = [] {
        pthread_atfork(nullptr, nullptr, forget_pool_in_child);
        return true;
    }();
    (void)registered;
    std::unique_ptr<Pool>& slot = pool_slot();
    if (!slot) slot = std::make_unique<Pool>(default_threads());
    return *slot;
}

}  // namespace

void set_num_threads(int n) {
    if (n < 1) n = 1;
    std::lock_guard<std::mutex> lock(pool_mutex());
    std::unique_ptr<Pool>& slot = pool_slot();
    if (slot && slot->n_threads() == n) return;
    slot.reset();
    slot = std::make_unique<Pool>(n);
}

int num_threads() {
    std::lock_guard<std::mutex> lock(pool_mutex());
    return pool_locked().n_threads();
}

PoolStats pool_stats() {
    std::lock_guard<std::mutex> lock(pool_mutex());
    return pool_locked().stats();
}

void parallel_for(int64_t n_tasks, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    std::lock_guard<std::mutex> lock(pool_mutex());
    pool_locked().run(n_tasks, grain, body);
}

}  // namespace lfm

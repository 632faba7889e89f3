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
        body_ = &body;
        n_tasks_ = n_tasks;
        grain_ = grain;
        next_.store(0, std::memory_order_relaxed);
        busy_.store(static_cast<int>(helpers_.size()), std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(sleep_mutex_);  // no lost wake-up: see helper_loop
            generation_.fetch_add(1, std::memory_order_release);
        }
        if (sleepers_.load(std::memory_order_acquire) > 0) wake_.notify_all();
        work();
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
    }

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

void parallel_for(int64_t n_tasks, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    std::lock_guard<std::mutex> lock(pool_mutex());
    pool_locked().run(n_tasks, grain, body);
}

}  // namespace lfm

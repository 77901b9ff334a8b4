// libcuda.so of the simulated device: the CUDA driver API calls sgdm makes (through cudarc and directly), on host
// memory, with kernels run by the SIMT executor on the host-compiled twins of the cubins NVRTC really built.
//
// Model:
// - Device memory is a reserved range of the address space. Each allocation sits at the end of its own pages,
//   256-byte aligned, with an inaccessible page after it and before the next one; freed memory becomes
//   inaccessible and its addresses are never handed out again. A kernel that runs off an allocation faults here as
//   on the GPU (the checked build reports the exact access first). New allocations hold 0xff bytes (NaN).
// - Work is queued per stream. With deferral on (the default), queued work runs only when the program must wait
//   for it (stream, event or context synchronisation, a blocking copy, an event query) and host buffers given to
//   asynchronous copies are treated as in flight until then: a device-to-host destination holds 0xff until the
//   copy runs, a host-to-device source must not change before it runs. A missing synchronisation therefore
//   shows up as NaN or as an error instead of passing by luck. (The real driver copies pageable host memory
//   synchronously; sgdm synchronises explicitly, and this mode holds it to that.)
// - Stream capture records a stream's work into a graph; a launched graph queues the recorded work again.
//   Calls a capture forbids (synchronisation, blocking copies and allocations, host copies) fail and invalidate it.
// - Launches are held to the cubin's limits (registers, static and dynamic shared memory, __launch_bounds__) and
//   sm_90's; each pointer argument must point into a live allocation, when queued and again when run.
// - One device, one primary context; as in the real driver, a thread must make a context current before use.
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cubin.h"
#include "simt.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
};

namespace cudasim {
namespace {

// ---- settings, diagnostics ---------------------------------------------------------------------------------------
struct Settings {
    bool deferred = true;
    bool report_times = false;  // print host time per kernel at exit
    size_t memory_bytes = size_t(80) << 30;  // what the device reports, as an H100's 80 GB
};
Settings g_settings;

// The detail of the last failure on this thread: printed, and part of cuGetErrorString's text, so the engine's
// error message carries it.
thread_local std::string tl_detail;

CUresult fail(CUresult rc, const std::string& detail) {
    tl_detail = detail;
    fprintf(stderr, "cudasim: %s\n", detail.c_str());
    return rc;
}

// Driver functions called so far (the probe test checks sgdm's symbol list covers them).
std::mutex g_called_mutex;
std::set<std::string> g_called;
#define CALLED()                                                  \
    do {                                                          \
        static std::atomic<bool> seen_{false};                    \
        if (!seen_.exchange(true)) {                              \
            std::lock_guard<std::mutex> lock_(g_called_mutex);    \
            g_called.insert(__func__);                            \
        }                                                         \
    } while (0)

// Host time spent in each kernel and GEMM shape, for finding what makes a simulated test slow (never a GPU time).
std::mutex g_times_mutex;
std::map<std::string, std::pair<uint64_t, double>> g_times;
void record_time(const std::string& what, std::chrono::steady_clock::time_point start) {
    if (!g_settings.report_times) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::lock_guard<std::mutex> lock(g_times_mutex);
    auto& t = g_times[what];
    ++t.first;
    t.second += s;
}
void print_times() {
    std::lock_guard<std::mutex> lock(g_times_mutex);
    std::vector<std::pair<double, std::string>> rows;
    double total = 0;
    for (auto& [name, t] : g_times) rows.push_back({t.second, name}), total += t.second;
    std::sort(rows.rbegin(), rows.rend());
    fprintf(stderr, "cudasim: host seconds per kernel (simulation time, not GPU time), total %.2f s:\n", total);
    for (size_t i = 0; i < rows.size() && i < 25; ++i)
        fprintf(stderr, "  %8.3f s %6llu x  %s\n", rows[i].first, (unsigned long long)g_times[rows[i].second].first,
                rows[i].second.c_str());
}

// ---- device memory -----------------------------------------------------------------------------------------------
constexpr size_t PAGE = 4096;
constexpr size_t ALIGN = 256;

struct Allocation {
    uintptr_t begin = 0, end = 0;          // what the program may touch
    uintptr_t map_begin = 0, map_end = 0;  // the pages holding it
    uint64_t id = 0;
    const char* how = "";
};

uintptr_t g_region = 0;
size_t g_region_bytes = 0;

struct DeviceMemory {
    std::mutex mu;
    uintptr_t next = 0;
    std::map<uintptr_t, Allocation> live;  // by begin
    std::deque<Allocation> freed;          // the most recent, for messages about use after free
    size_t used = 0, peak = 0;
    uint64_t ids = 0;

    bool reserve() {
        if (g_region) return true;
        for (int shift = 44; shift >= 36; --shift) {  // 16 TiB of addresses, less where the system refuses
            void* p = mmap(nullptr, size_t(1) << shift, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p != MAP_FAILED) {
                g_region = reinterpret_cast<uintptr_t>(p);
                g_region_bytes = size_t(1) << shift;
                next = g_region + PAGE;
                return true;
            }
        }
        return false;
    }

    CUresult allocate(size_t bytes, const char* how, CUdeviceptr* out) {
        std::lock_guard<std::mutex> lock(mu);
        if (!reserve()) return fail(CUDA_ERROR_OUT_OF_MEMORY, "cannot reserve an address range for device memory");
        const size_t rounded = (bytes + ALIGN - 1) / ALIGN * ALIGN;
        if (used + rounded > g_settings.memory_bytes)
            return fail(CUDA_ERROR_OUT_OF_MEMORY, format("%s of %zu bytes: out of device memory (%zu of %zu bytes in use)",
                                                         how, bytes, used, g_settings.memory_bytes));
        const size_t pages = (rounded + PAGE - 1) / PAGE * PAGE + (rounded == 0 ? PAGE : 0);
        if (next + pages + PAGE > g_region + g_region_bytes)
            return fail(CUDA_ERROR_OUT_OF_MEMORY, "the simulator's device address range is used up");
        Allocation a;
        a.map_begin = next;
        a.map_end = next + pages;
        a.end = a.map_end;
        a.begin = a.end - rounded;
        a.end = a.begin + bytes;
        a.id = ++ids;
        a.how = how;
        next = a.map_end + PAGE;  // the guard page stays inaccessible
        if (mprotect(reinterpret_cast<void*>(a.map_begin), pages, PROT_READ | PROT_WRITE) != 0)
            return fail(CUDA_ERROR_OUT_OF_MEMORY, format("%s of %zu bytes: the host refused the memory", how, bytes));
        memset(reinterpret_cast<void*>(a.begin), 0xff, bytes);
        live[a.begin] = a;
        used += rounded;
        peak = std::max(peak, used);
        *out = a.begin;
        return CUDA_SUCCESS;
    }

    // Frees the allocation starting at `p`; empty, or why it cannot be freed.
    std::string release(uintptr_t p, const char* how) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = live.find(p);
        if (it == live.end()) {
            std::string why;
            describe_locked(p, 1, &why);
            return format("%s of 0x%lx, which is not the start of a live allocation: %s", how, (unsigned long)p,
                          why.c_str());
        }
        const Allocation a = it->second;
        live.erase(it);
        used -= (a.end - a.begin + ALIGN - 1) / ALIGN * ALIGN;
        madvise(reinterpret_cast<void*>(a.map_begin), a.map_end - a.map_begin, MADV_DONTNEED);
        mprotect(reinterpret_cast<void*>(a.map_begin), a.map_end - a.map_begin, PROT_NONE);
        freed.push_back(a);
        if (freed.size() > 4096) freed.pop_front();
        return "";
    }

    // Whether [p, p + n) is inside one live allocation; else why not. `found` gets that allocation, or, on
    // failure, the one the access ran off or into (if any).
    bool describe_locked(uintptr_t p, size_t n, std::string* why, Allocation* found = nullptr) {
        auto it = live.upper_bound(p);
        if (it != live.begin()) {
            const Allocation& a = std::prev(it)->second;
            if (p >= a.begin && p + n <= a.end) {
                if (found) *found = a;
                return true;
            }
            if (p >= a.begin && p < a.map_end + PAGE) {
                if (found) *found = a;
                *why = format("%zu bytes past the end of allocation #%llu (%zu bytes, %s)", size_t(p + n - a.end),
                              (unsigned long long)a.id, size_t(a.end - a.begin), a.how);
                return false;
            }
        }
        if (it != live.end() && p + n > it->second.begin && p >= it->second.map_begin) {
            if (found) *found = it->second;
            *why = format("%zu bytes before the start of allocation #%llu (%zu bytes, %s)", size_t(it->second.begin - p),
                          (unsigned long long)it->second.id, size_t(it->second.end - it->second.begin), it->second.how);
            return false;
        }
        for (auto f = freed.rbegin(); f != freed.rend(); ++f)
            if (p >= f->map_begin && p < f->map_end) {
                if (found) *found = *f;
                *why = format("inside allocation #%llu (%zu bytes, %s), which has been freed", (unsigned long long)f->id,
                              size_t(f->end - f->begin), f->how);
                return false;
            }
        *why = "no allocation was ever made there";
        return false;
    }

    bool find(uintptr_t p, size_t n, std::string* why, Allocation* found = nullptr) {
        std::lock_guard<std::mutex> lock(mu);
        return describe_locked(p, n, why, found);
    }
};
DeviceMemory g_memory;

// ---- work: streams, events, graphs -------------------------------------------------------------------------------
// One queued operation: returns an empty string, or what went wrong.
struct Op {
    std::string what;
    std::function<std::string()> run;
};

struct Graph {
    std::vector<Op> ops;
    std::vector<uintptr_t> allocations;  // made by the capture, released with the graph
};

enum CaptureMode { CAPTURE_GLOBAL = 0, CAPTURE_THREAD_LOCAL = 1, CAPTURE_RELAXED = 2 };

struct Stream {
    std::recursive_mutex mu;
    std::deque<Op> queue;
    uint64_t enqueued = 0, executed = 0;
    std::string error;  // of work that ran, for the next synchronisation
    // capture
    Graph* capture = nullptr;
    int capture_mode = 0;
    std::thread::id capture_thread;
    std::string invalidated;  // why the capture can no longer end in a graph
    bool legacy = false;
};

struct Event {
    Stream* stream = nullptr;
    uint64_t position = 0;  // done once the stream has executed this many operations
    bool recorded = false;
    std::chrono::steady_clock::time_point at;
    std::shared_ptr<std::chrono::steady_clock::time_point> done_at;
};

struct GraphExec {
    std::vector<Op> ops;
};

std::mutex g_streams_mutex;
std::set<Stream*> g_streams;
Stream g_legacy_stream;

Stream* stream_of(void* handle) {
    if (!handle) {
        g_legacy_stream.legacy = true;
        return &g_legacy_stream;
    }
    return static_cast<Stream*>(handle);
}

// Runs queued work of `s` until `until` operations have run (or all). The first failure drops the rest of the
// queue (the GPU would not run it meaningfully either) and is kept for the next synchronisation.
void drain(Stream& s, uint64_t until = UINT64_MAX) {
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    while (!s.queue.empty() && s.executed < until) {
        Op op = std::move(s.queue.front());
        s.queue.pop_front();
        const auto start = std::chrono::steady_clock::now();
        std::string error = op.run();
        record_time(op.what, start);
        ++s.executed;
        if (!error.empty()) {
            const std::string detail = op.what + ": " + error;
            fprintf(stderr, "cudasim: %s\n", detail.c_str());
            if (s.error.empty()) s.error = detail;
            s.executed += s.queue.size();
            s.queue.clear();
        }
    }
}

// Runs the queued work of every stream. Holds the stream list throughout, so no stream can be destroyed (by
// another thread) while it is drained.
void drain_all() {
    std::lock_guard<std::mutex> lock(g_streams_mutex);
    drain(g_legacy_stream);
    for (Stream* s : g_streams) drain(*s);
}

// The error of work that ran on `s`, reported once, as the real driver reports a kernel's fault at the next
// synchronisation.
CUresult take_error(Stream& s) {
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    if (s.error.empty()) return CUDA_SUCCESS;
    tl_detail = s.error;
    s.error.clear();
    return CUDA_ERROR_LAUNCH_FAILED;
}

bool capturing_here(const Stream& s) {
    return s.capture && (s.capture_mode == CAPTURE_GLOBAL ||
                         (s.capture_mode == CAPTURE_THREAD_LOCAL && s.capture_thread == std::this_thread::get_id()));
}

// A copy between device and pageable host memory on a capturing stream: refused, and the capture invalidated
// (a graph cannot replay a read or write of pageable host memory).
CUresult refuse_host_copy(Stream& s, const char* call, const char* what) {
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    if (s.invalidated.empty()) s.invalidated = std::string(call) + " was captured";
    return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                format("%s %s pageable host memory during a stream capture (the capture is now invalid)", call, what));
}

// A call that a capture in GLOBAL or THREAD_LOCAL mode forbids (it may synchronise): fails and invalidates
// every such capture that covers this thread, as the real driver does.
CUresult refuse_during_capture(const char* call) {
    std::lock_guard<std::mutex> lock(g_streams_mutex);
    bool refused = false;
    for (Stream* s : g_streams)
        if (capturing_here(*s)) {
            if (s->invalidated.empty()) s->invalidated = std::string(call) + " was called during the capture";
            refused = true;
        }
    if (refused)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                    format("%s is not permitted while a stream is being captured (the capture is now invalid)", call));
    return CUDA_SUCCESS;
}

// Queues `op` on `s`, or records it into the graph while `s` captures. Call `settle` after the last op of an API
// call: with deferral off it runs the queue now and returns the first failure, as CUDA_LAUNCH_BLOCKING=1 would.
CUresult enqueue(Stream& s, Op op) {
    std::lock_guard<std::recursive_mutex> lock(s.mu);
    if (s.capture) {
        if (s.capture_mode == CAPTURE_THREAD_LOCAL && s.capture_thread != std::this_thread::get_id())
            return fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, op.what + ": the stream is captured by another thread");
        s.capture->ops.push_back(std::move(op));
        return CUDA_SUCCESS;
    }
    s.queue.push_back(std::move(op));
    ++s.enqueued;
    return CUDA_SUCCESS;
}

CUresult settle(Stream& s) {
    if (g_settings.deferred) return CUDA_SUCCESS;
    drain(s);
    return take_error(s);
}

CUresult submit(Stream& s, Op op) {
    if (CUresult rc = enqueue(s, std::move(op))) return rc;
    return settle(s);
}

// ---- modules and kernels ---------------------------------------------------------------------------------------
std::mutex g_kernels_mutex;
std::map<std::string, Kernel> g_kernels;  // every kernel of every loaded twin, by name

struct Function {
    const Kernel* kernel;
    CubinKernel cubin;
    int max_dynamic_shared = -1;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, as set by the program
};
struct Module {
    std::map<std::string, Function> functions;
};

constexpr unsigned MAX_THREADS = 1024;
constexpr unsigned REGISTERS_PER_BLOCK = 65536;
constexpr unsigned SHARED_DEFAULT = 48 * 1024;
constexpr unsigned SHARED_OPTIN = 232448;  // sm_90: 227 KiB per block with the opt-in attribute

// The most threads a block of `f` can have: its launch bounds and the register file (registers are allocated
// per warp in units of 256).
unsigned max_threads(const Function& f) {
    unsigned limit = std::min(MAX_THREADS, f.cubin.max_threads);
    if (f.cubin.registers) {
        const unsigned per_warp = (f.cubin.registers * 32 + 255) / 256 * 256;
        limit = std::min(limit, REGISTERS_PER_BLOCK / per_warp * 32);
    }
    return limit;
}

std::string check_pointer(const Kernel& k, unsigned i, uintptr_t p) {
    if (!p) return "";
    const std::string arg = format("argument %u (%s)", i, k.param_names.size() > i ? k.param_names[i].c_str() : "?");
    if (!in_device_range(p))
        return format("%s = 0x%lx is not a device address (a kernel cannot read host memory)", arg.c_str(), (unsigned long)p);
    std::string why;
    // A zero-length range: one past the end of an allocation is a valid pointer as long as nothing reads it.
    if (g_memory.find(p, 0, &why)) return "";
    return format("%s = 0x%lx points %s", arg.c_str(), (unsigned long)p, why.c_str());
}

// ---- the plain build's faults: a kernel touching an inaccessible device page ---------------------------------------
struct sigaction g_previous_segv;
void on_segv(int sig, siginfo_t* info, void* context) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
    if (in_device_range(a)) {
        std::string why;
        g_memory.find(a, 1, &why);
        char line[1024];
        const int n = snprintf(line, sizeof line,
                               "cudasim: fault at device address 0x%lx (%s); run with SGDM_SIM_CHECK=memory to see the "
                               "kernel, thread and source line of the access\n",
                               (unsigned long)a, why.c_str());
        if (n > 0) (void)!write(2, line, size_t(n));
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
        return;
    }
    if (g_previous_segv.sa_flags & SA_SIGINFO) {
        g_previous_segv.sa_sigaction(sig, info, context);
    } else if (g_previous_segv.sa_handler != SIG_DFL && g_previous_segv.sa_handler != SIG_IGN) {
        g_previous_segv.sa_handler(sig);
    } else {
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
    }
}

}  // namespace

bool in_device_range(uintptr_t address) { return address - g_region < g_region_bytes; }

bool find_allocation(uintptr_t address, size_t bytes, uintptr_t* begin, uintptr_t* end, std::string* why) {
    Allocation a;
    const bool ok = g_memory.find(address, bytes, why, &a);
    *begin = a.begin;
    *end = a.end;
    return ok;
}

}  // namespace cudasim

using namespace cudasim;

// ---- the simulator's own interface (used by src/runtime/cudasim.rs and libcublasLt.so) ----------------------------
extern "C" {

struct cudasim_config {
    unsigned struct_size;
    int deferred;
    int thread_order;  // 0 forward, 1 reverse, 2 random
    int block_order;
    unsigned long long seed;
    int shared_fill_nan;
    unsigned long long memory_bytes;
    int report_times;
};

struct cudasim_stats {
    unsigned long long launches, blocks, threads, barriers, collectives, races, bad_accesses;
    unsigned long long memory_in_use, memory_peak;
};

__attribute__((visibility("default"))) const char* cudasim_identity() {
    return "cudasim 1 (simulated sm_90 on the host CPU)";
}

__attribute__((visibility("default"))) int cudasim_configure(const cudasim_config* c) {
    if (!c || c->struct_size != sizeof(cudasim_config)) return 1;
    g_settings.deferred = c->deferred != 0;
    if (c->report_times && !g_settings.report_times) atexit(print_times);
    g_settings.report_times = c->report_times != 0;
    if (c->memory_bytes) g_settings.memory_bytes = c->memory_bytes;
    ExecutorOptions& o = executor_options();
    o.thread_order = Order(c->thread_order);
    o.block_order = Order(c->block_order);
    o.seed = c->seed;
    o.shared_fill_nan = c->shared_fill_nan != 0;
    static std::once_flag installed;
    std::call_once(installed, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_previous_segv);
    });
    std::lock_guard<std::mutex> lock(g_memory.mu);
    return g_memory.reserve() ? 0 : 2;
}

// Loads a twin library and registers its kernels. 0, or non-zero with `error` filled.
__attribute__((visibility("default"))) int cudasim_load_twin(const char* path, char* error, size_t error_len) {
    auto report = [&](const std::string& e) {
        snprintf(error, error_len, "%s", e.c_str());
        return 1;
    };
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return report(format("cannot load %s: %s", path, dlerror()));
    typedef int (*ListFn)(const TwinKernel**);
    ListFn list = reinterpret_cast<ListFn>(dlsym(h, "cudasim_twin_kernels"));
    if (!list) return report(format("%s is not a kernel twin (no cudasim_twin_kernels)", path));
    const TwinKernel* kernels = nullptr;
    const int n = list(&kernels);
    std::lock_guard<std::mutex> lock(g_kernels_mutex);
    for (int i = 0; i < n; ++i) {
        const TwinKernel& t = kernels[i];
        auto existing = g_kernels.find(t.name);
        if (existing != g_kernels.end() && existing->second.twin != path)
            return report(format("kernel %s is defined by both %s and %s", t.name, existing->second.twin.c_str(), path));
        Kernel k;
        k.name = t.name;
        k.twin = path;
        k.thunk = t.thunk;
        for (int p = 0; p < t.param_count; ++p) {
            k.param_sizes.push_back(t.param_sizes[p]);
            k.param_is_pointer.push_back(t.param_is_pointer[p] != 0);
        }
        std::string names = t.param_names;
        size_t start = 0;
        while (start <= names.size()) {
            const size_t comma = names.find(',', start);
            k.param_names.push_back(names.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
            if (comma == std::string::npos) break;
            start = comma + 1;
        }
        g_kernels[t.name] = std::move(k);
    }
    return 0;
}

__attribute__((visibility("default"))) void cudasim_get_stats(cudasim_stats* out) {
    const ExecutorStats e = executor_stats();
    std::lock_guard<std::mutex> lock(g_memory.mu);
    *out = {e.launches, e.blocks, e.threads, e.barriers, e.collectives, e.races, e.bad_accesses, g_memory.used,
            g_memory.peak};
}

// The driver functions called so far, comma-separated; returns the length needed.
__attribute__((visibility("default"))) size_t cudasim_called_functions(char* out, size_t len) {
    std::lock_guard<std::mutex> lock(g_called_mutex);
    std::string all;
    for (const std::string& f : g_called) all += (all.empty() ? "" : ",") + f;
    if (out && len) snprintf(out, len, "%s", all.c_str());
    return all.size() + 1;
}

// Host work on a stream (the cuBLASLt stand-in's GEMMs): `ranges` are (address, bytes) pairs of device memory the
// work touches, each checked against the live allocations when queued and again when run. `run` returns 0 or
// fills `error`. The driver owns `arg` and calls `drop(arg)` when the work (or a graph holding it) is gone.
__attribute__((visibility("default"))) int cudasim_enqueue_host_work(void* stream, const char* what,
                                                                     int (*run)(void*, char*, size_t), void* arg,
                                                                     void (*drop)(void*), const uint64_t* ranges,
                                                                     int range_count) {
    std::shared_ptr<void> owned(arg, drop);
    std::vector<std::pair<uint64_t, uint64_t>> r;
    for (int i = 0; i < range_count; ++i) r.push_back({ranges[2 * i], ranges[2 * i + 1]});
    const std::string name = what;
    auto check = [r, name]() -> std::string {
        for (size_t i = 0; i < r.size(); ++i) {
            if (!r[i].second) continue;
            std::string why;
            if (!in_device_range(r[i].first))
                return format("operand %zu at 0x%lx is not device memory", i, (unsigned long)r[i].first);
            if (!g_memory.find(r[i].first, r[i].second, &why))
                return format("operand %zu, %lu bytes at 0x%lx: %s", i, (unsigned long)r[i].second,
                              (unsigned long)r[i].first, why.c_str());
        }
        return "";
    };
    const std::string now = check();
    if (!now.empty()) return fail(CUDA_ERROR_INVALID_VALUE, name + ": " + now);
    Op op{name, [check, run, owned]() -> std::string {
              std::string e = check();
              if (!e.empty()) return e;
              char error[1024] = {0};
              if (run(owned.get(), error, sizeof error) != 0) return error[0] ? error : "failed";
              return "";
          }};
    return submit(*stream_of(stream), std::move(op));
}

}  // extern "C"

// ---- the CUDA driver API -----------------------------------------------------------------------------------------
namespace {
struct Context {
    int device = 0;
};
Context g_primary;
thread_local Context* tl_context = nullptr;
std::atomic<bool> g_initialized{false};

CUresult need_context(const char* call) {
    if (!g_initialized) return fail(CUDA_ERROR_NOT_INITIALIZED, std::string(call) + " before cuInit");
    if (!tl_context)
        return fail(CUDA_ERROR_INVALID_CONTEXT,
                    std::string(call) + ": no context is current on this thread (cuCtxSetCurrent first, as the real driver requires)");
    return CUDA_SUCCESS;
}

// A copy's device range, checked now (and again when it runs).
CUresult check_range(const char* what, CUdeviceptr p, size_t n) {
    if (!n) return CUDA_SUCCESS;
    std::string why;
    if (!in_device_range(p)) return fail(CUDA_ERROR_INVALID_VALUE, format("%s: 0x%llx is not device memory", what, p));
    if (!g_memory.find(p, n, &why)) return fail(CUDA_ERROR_INVALID_VALUE, format("%s of %zu bytes at 0x%llx: %s", what, n, p, why.c_str()));
    return CUDA_SUCCESS;
}
std::string recheck(const char* what, CUdeviceptr p, size_t n) {
    std::string why;
    if (n && !g_memory.find(p, n, &why)) return format("%s of %zu bytes at 0x%llx: %s", what, n, p, why.c_str());
    return "";
}

uint64_t fingerprint(const void* p, size_t n) {
    const unsigned char* b = static_cast<const unsigned char*>(p);
    uint64_t h = 1469598103934665603ull;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 1099511628211ull;
    }
    for (; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

const char* error_name(CUresult rc) {
    switch (rc) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}
}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API CUresult cuInit(unsigned flags) {
    CALLED();
    if (flags) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0");
    g_initialized = true;
    return CUDA_SUCCESS;
}
API CUresult cuDriverGetVersion(int* v) {
    CALLED();
    *v = 13000;
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorName(CUresult rc, const char** s) {
    CALLED();
    *s = error_name(rc);
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorString(CUresult rc, const char** s) {
    CALLED();
    // Thread-local: the text stays valid until the next call on this thread, long enough to format an error.
    thread_local std::string text;
    text = std::string(error_name(rc)) + (tl_detail.empty() ? "" : " (cudasim: " + tl_detail + ")");
    *s = text.c_str();
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
    CALLED();
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    *n = 1;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    CALLED();
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal != 0) return fail(CUDA_ERROR_INVALID_DEVICE, format("cuDeviceGet(%d): the simulator has one device, 0", ordinal));
    *d = 0;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    CALLED();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, size_t(len), "cudasim: simulated sm_90 device (host CPU, not a GPU)");
    return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    CALLED();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = g_settings.memory_bytes;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice d) {
    CALLED();
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
        case 1: *v = int(MAX_THREADS); break;         // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;             // MAX_BLOCK_DIM_X, Y
        case 4: *v = 64; break;                       // MAX_BLOCK_DIM_Z
        case 5: *v = 2147483647; break;               // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;            // MAX_GRID_DIM_Y, Z
        case 8: *v = int(SHARED_DEFAULT); break;      // MAX_SHARED_MEMORY_PER_BLOCK
        case 10: *v = 32; break;                      // WARP_SIZE
        case 12: *v = int(REGISTERS_PER_BLOCK); break;  // MAX_REGISTERS_PER_BLOCK
        case 16: *v = 132; break;                     // MULTIPROCESSOR_COUNT (an H100 SXM's)
        case 39: *v = 2048; break;                    // MAX_THREADS_PER_MULTIPROCESSOR
        case 75: *v = 9; break;                       // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;                       // COMPUTE_CAPABILITY_MINOR
        case 97: *v = int(SHARED_OPTIN); break;       // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = 1; break;                      // MEMORY_POOLS_SUPPORTED
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
    CALLED();
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *ctx = &g_primary;
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) {
    CALLED();
    return CUDA_SUCCESS;
}
API CUresult cuCtxSetCurrent(void* ctx) {
    CALLED();
    if (ctx && ctx != &g_primary) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: not a context of this driver");
    tl_context = static_cast<Context*>(ctx);
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetCurrent(void** ctx) {
    CALLED();
    *ctx = tl_context;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    CALLED();
    if (CUresult rc = need_context("cuCtxGetDevice")) return rc;
    *d = 0;
    return CUDA_SUCCESS;
}
API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
API CUresult cuCtxPopCurrent_v2(void** ctx) {
    CALLED();
    if (ctx) *ctx = tl_context;
    tl_context = nullptr;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() {
    CALLED();
    if (CUresult rc = need_context("cuCtxSynchronize")) return rc;
    if (CUresult rc = refuse_during_capture("cuCtxSynchronize")) return rc;
    drain_all();
    std::lock_guard<std::mutex> lock(g_streams_mutex);
    CUresult rc = take_error(g_legacy_stream);
    for (Stream* s : g_streams)
        if (CUresult e = take_error(*s); e && !rc) rc = e;
    return rc;
}
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    CALLED();
    if (CUresult rc = need_context("cuMemGetInfo")) return rc;
    std::lock_guard<std::mutex> lock(g_memory.mu);
    *total = g_settings.memory_bytes;
    *free_bytes = g_settings.memory_bytes - std::min(g_settings.memory_bytes, g_memory.used);
    return CUDA_SUCCESS;
}

// ---- streams and events ------------------------------------------------------------------------------------------
API CUresult cuStreamCreate(void** s, unsigned) {
    CALLED();
    if (CUresult rc = need_context("cuStreamCreate")) return rc;
    Stream* stream = new Stream();
    std::lock_guard<std::mutex> lock(g_streams_mutex);
    g_streams.insert(stream);
    *s = stream;
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
API CUresult cuStreamDestroy_v2(void* handle) {
    CALLED();
    if (!handle) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = stream_of(handle);
    std::lock_guard<std::mutex> lock(g_streams_mutex);
    g_streams.erase(s);
    drain(*s);  // as the real driver: work already queued completes
    delete s;
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(void* handle) {
    CALLED();
    Stream* s = stream_of(handle);
    if (s->capture) {
        std::lock_guard<std::recursive_mutex> lock(s->mu);
        if (s->invalidated.empty()) s->invalidated = "cuStreamSynchronize was called on the capturing stream";
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize on a stream that is being captured");
    }
    if (CUresult rc = refuse_during_capture("cuStreamSynchronize")) return rc;
    drain(*s);
    return take_error(*s);
}
API CUresult cuStreamQuery(void* handle) {
    CALLED();
    Stream* s = stream_of(handle);
    if (CUresult rc = refuse_during_capture("cuStreamQuery")) return rc;
    bool pending;
    {
        std::lock_guard<std::recursive_mutex> lock(s->mu);
        pending = !s->queue.empty();
    }
    drain(*s);  // the work makes progress, but was not done when asked
    if (CUresult rc = take_error(*s)) return rc;
    return pending ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}
API CUresult cuEventCreate(void** e, unsigned) {
    CALLED();
    if (CUresult rc = need_context("cuEventCreate")) return rc;
    *e = new Event();
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(void* e) {
    CALLED();
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(void* handle, void* stream) {
    CALLED();
    Event* e = static_cast<Event*>(handle);
    Stream* s = stream_of(stream);
    auto done = std::make_shared<std::chrono::steady_clock::time_point>();
    {
        std::lock_guard<std::recursive_mutex> lock(s->mu);
        Op op{"event record", [done]() {
                  *done = std::chrono::steady_clock::now();
                  return std::string();
              }};
        if (CUresult rc = enqueue(*s, std::move(op))) return rc;
        e->done_at = done;
        e->stream = s;
        e->recorded = true;
        e->position = s->enqueued;
    }
    return settle(*s);
}
API CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
static CUresult event_wait(Event* e, const char* call) {
    if (!e->recorded) return CUDA_SUCCESS;  // an event never recorded counts as complete
    if (CUresult rc = refuse_during_capture(call)) return rc;
    drain(*e->stream, e->position);
    return take_error(*e->stream);
}
API CUresult cuEventSynchronize(void* handle) {
    CALLED();
    return event_wait(static_cast<Event*>(handle), "cuEventSynchronize");
}
API CUresult cuEventQuery(void* handle) {
    CALLED();
    Event* e = static_cast<Event*>(handle);
    if (!e->recorded) return CUDA_SUCCESS;
    bool pending;
    {
        std::lock_guard<std::recursive_mutex> lock(e->stream->mu);
        pending = e->stream->executed < e->position;
    }
    if (CUresult rc = event_wait(e, "cuEventQuery")) return rc;
    return pending ? CUDA_ERROR_NOT_READY : CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    CALLED();
    Event *a = static_cast<Event*>(start), *b = static_cast<Event*>(end);
    for (Event* e : {a, b}) {
        if (!e->recorded) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventElapsedTime: an event was never recorded");
        std::lock_guard<std::recursive_mutex> lock(e->stream->mu);
        if (e->stream->executed < e->position)
            return fail(CUDA_ERROR_NOT_READY, "cuEventElapsedTime: an event has not completed (synchronise on it first)");
    }
    // Host time between the two points of the simulation: not a GPU time.
    *ms = float(std::chrono::duration<double, std::milli>(*b->done_at - *a->done_at).count());
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }
API CUresult cuStreamWaitEvent(void* stream, void* handle, unsigned) {
    CALLED();
    Event* e = static_cast<Event*>(handle);
    if (!e->recorded) return CUDA_SUCCESS;
    Stream* waited = e->stream;
    const uint64_t position = e->position;
    return submit(*stream_of(stream), Op{"stream wait event", [waited, position]() {
                                              drain(*waited, position);
                                              std::lock_guard<std::recursive_mutex> lock(waited->mu);
                                              return waited->error.empty() ? std::string()
                                                                           : "the awaited stream failed: " + waited->error;
                                          }});
}

// ---- memory ------------------------------------------------------------------------------------------------------
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    CALLED();
    if (CUresult rc = need_context("cuMemAlloc")) return rc;
    if (CUresult rc = refuse_during_capture("cuMemAlloc")) return rc;
    return g_memory.allocate(bytes, "cuMemAlloc", p);
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    CALLED();
    if (CUresult rc = need_context("cuMemFree")) return rc;
    if (CUresult rc = refuse_during_capture("cuMemFree")) return rc;
    if (!p) return CUDA_SUCCESS;
    drain_all();  // the real cuMemFree waits for work that may still use the memory
    const std::string error = g_memory.release(p, "cuMemFree");
    return error.empty() ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_VALUE, error);
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemAllocAsync")) return rc;
    Stream* s = stream_of(stream);
    if (CUresult rc = g_memory.allocate(bytes, s->capture ? "cuMemAllocAsync during a graph capture" : "cuMemAllocAsync", p))
        return rc;
    if (s->capture) {
        std::lock_guard<std::recursive_mutex> lock(s->mu);
        s->capture->allocations.push_back(*p);
        const CUdeviceptr a = *p;
        // Each launch of the graph starts with the allocation's contents undefined again.
        s->capture->ops.push_back(Op{"graph allocation", [a, bytes]() {
                                         memset(reinterpret_cast<void*>(a), 0xff, bytes);
                                         return std::string();
                                     }});
    }
    return CUDA_SUCCESS;
}
API CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemFreeAsync")) return rc;
    if (!p) return CUDA_SUCCESS;
    Stream* s = stream_of(stream);
    if (s->capture) {
        std::lock_guard<std::recursive_mutex> lock(s->mu);
        for (uintptr_t a : s->capture->allocations)
            if (a == p) return CUDA_SUCCESS;  // a graph allocation: released with the graph
    }
    std::string why;
    if (!g_memory.find(p, 0, &why)) return fail(CUDA_ERROR_INVALID_VALUE, format("cuMemFreeAsync of 0x%llx: %s", p, why.c_str()));
    // Stream-ordered: the memory stays valid for the work queued before the free.
    return submit(*s, Op{"cuMemFreeAsync", [p]() { return g_memory.release(p, "cuMemFreeAsync"); }});
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemcpyHtoDAsync")) return rc;
    if (CUresult rc = check_range("cuMemcpyHtoDAsync destination", dst, n)) return rc;
    Stream* s = stream_of(stream);
    if (s->capture) return refuse_host_copy(*s, "cuMemcpyHtoDAsync", "from");
    const uint64_t print = g_settings.deferred ? fingerprint(src, n) : 0;
    const bool deferred = g_settings.deferred;
    return submit(*s, Op{"cuMemcpyHtoDAsync", [=]() {
                              std::string e = recheck("destination", dst, n);
                              if (!e.empty()) return e;
                              if (deferred && fingerprint(src, n) != print)
                                  return format("the %zu-byte host source changed between the call and the copy: it must "
                                                "stay unchanged until the stream is synchronised", n);
                              memcpy(reinterpret_cast<void*>(dst), src, n);
                              return std::string();
                          }});
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemcpyDtoHAsync")) return rc;
    if (CUresult rc = check_range("cuMemcpyDtoHAsync source", src, n)) return rc;
    Stream* s = stream_of(stream);
    if (s->capture) return refuse_host_copy(*s, "cuMemcpyDtoHAsync", "to");
    if (g_settings.deferred) memset(dst, 0xff, n);  // in flight: nothing valid to read until synchronised
    return submit(*s, Op{"cuMemcpyDtoHAsync", [=]() {
                              std::string e = recheck("source", src, n);
                              if (!e.empty()) return e;
                              memcpy(dst, reinterpret_cast<const void*>(src), n);
                              return std::string();
                          }});
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemcpyDtoDAsync")) return rc;
    if (CUresult rc = check_range("cuMemcpyDtoDAsync destination", dst, n)) return rc;
    if (CUresult rc = check_range("cuMemcpyDtoDAsync source", src, n)) return rc;
    return submit(*stream_of(stream), Op{"cuMemcpyDtoDAsync", [=]() {
                                              std::string e = recheck("destination", dst, n);
                                              if (e.empty()) e = recheck("source", src, n);
                                              if (!e.empty()) return e;
                                              memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
                                              return std::string();
                                          }});
}
// The blocking copies: wait for all work, copy, return.
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    CALLED();
    if (CUresult rc = refuse_during_capture("cuMemcpyHtoD")) return rc;
    if (CUresult rc = cuMemcpyHtoDAsync_v2(dst, src, n, nullptr)) return rc;
    return cuStreamSynchronize(nullptr);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    CALLED();
    if (CUresult rc = refuse_during_capture("cuMemcpyDtoH")) return rc;
    if (CUresult rc = cuMemcpyDtoHAsync_v2(dst, src, n, nullptr)) return rc;
    return cuStreamSynchronize(nullptr);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CALLED();
    if (CUresult rc = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr)) return rc;
    return cuStreamSynchronize(nullptr);
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemsetD8Async")) return rc;
    if (CUresult rc = check_range("cuMemsetD8Async", dst, n)) return rc;
    return submit(*stream_of(stream), Op{"cuMemsetD8Async", [=]() {
                                              std::string e = recheck("destination", dst, n);
                                              if (!e.empty()) return e;
                                              memset(reinterpret_cast<void*>(dst), v, n);
                                              return std::string();
                                          }});
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* stream) {
    CALLED();
    if (CUresult rc = need_context("cuMemsetD32Async")) return rc;
    if (dst % 4) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemsetD32Async: the destination is not 4-byte aligned");
    if (CUresult rc = check_range("cuMemsetD32Async", dst, n * 4)) return rc;
    return submit(*stream_of(stream), Op{"cuMemsetD32Async", [=]() {
                                              std::string e = recheck("destination", dst, n * 4);
                                              if (!e.empty()) return e;
                                              for (size_t i = 0; i < n; ++i) reinterpret_cast<unsigned*>(dst)[i] = v;
                                              return std::string();
                                          }});
}

// ---- modules and launches ----------------------------------------------------------------------------------------
API CUresult cuModuleLoadData(void** module, const void* image) {
    CALLED();
    if (CUresult rc = need_context("cuModuleLoadData")) return rc;
    std::map<std::string, CubinKernel> cubin;
    std::string error;
    if (!read_cubin(image, cubin, &error)) return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: " + error);
    auto m = std::make_unique<Module>();
    std::lock_guard<std::mutex> lock(g_kernels_mutex);
    for (auto& [name, info] : cubin) {
        auto k = g_kernels.find(name);
        if (k == g_kernels.end())
            return fail(CUDA_ERROR_INVALID_IMAGE, format("cuModuleLoadData: the cubin's kernel %s has no host twin (the "
                                                         "twins were built from other sources)", name.c_str()));
        const Kernel& kernel = k->second;
        // The twin and the cubin come from the same source: their parameter lists must agree byte for byte.
        if (info.param_sizes.size() != kernel.param_sizes.size())
            return fail(CUDA_ERROR_INVALID_IMAGE, format("kernel %s: the cubin has %zu parameters, its twin %zu", name.c_str(),
                                                         info.param_sizes.size(), kernel.param_sizes.size()));
        for (size_t i = 0; i < info.param_sizes.size(); ++i)
            if (info.param_sizes[i] != kernel.param_sizes[i])
                return fail(CUDA_ERROR_INVALID_IMAGE, format("kernel %s parameter %zu: %u bytes in the cubin, %u in its twin",
                                                             name.c_str(), i, info.param_sizes[i], kernel.param_sizes[i]));
        m->functions[name] = Function{&kernel, info, -1};
    }
    *module = m.release();
    return CUDA_SUCCESS;
}
API CUresult cuModuleLoadDataEx(void** module, const void* image, unsigned, void*, void**) {
    return cuModuleLoadData(module, image);
}
API CUresult cuModuleUnload(void* module) {
    CALLED();
    delete static_cast<Module*>(module);
    return CUDA_SUCCESS;
}
API CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    CALLED();
    Module* m = static_cast<Module*>(module);
    auto it = m->functions.find(name);
    if (it == m->functions.end()) return fail(CUDA_ERROR_NOT_FOUND, format("cuModuleGetFunction: no kernel %s in the module", name));
    *f = &it->second;
    return CUDA_SUCCESS;
}
API CUresult cuFuncGetAttribute(int* v, int attribute, void* handle) {
    CALLED();
    const Function& f = *static_cast<Function*>(handle);
    switch (attribute) {
        case 0: *v = int(max_threads(f)); break;            // MAX_THREADS_PER_BLOCK
        case 1: *v = int(f.cubin.static_shared); break;     // SHARED_SIZE_BYTES
        case 2: case 3: *v = 0; break;                      // CONST_SIZE_BYTES, LOCAL_SIZE_BYTES
        case 4: *v = int(f.cubin.registers); break;         // NUM_REGS
        case 5: case 6: *v = 90; break;                     // PTX_VERSION, BINARY_VERSION
        case 8: *v = f.max_dynamic_shared >= 0 ? f.max_dynamic_shared : int(SHARED_DEFAULT - f.cubin.static_shared); break;
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(void* handle, int attribute, int value) {
    CALLED();
    Function& f = *static_cast<Function*>(handle);
    if (attribute == 8) {  // MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || unsigned(value) + f.cubin.static_shared > SHARED_OPTIN)
            return fail(CUDA_ERROR_INVALID_VALUE, format("%s: %d bytes of dynamic shared memory exceed the %u per block of sm_90",
                                                         f.kernel->name.c_str(), value, SHARED_OPTIN));
        f.max_dynamic_shared = value;
    }
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetCacheConfig(void*, int) {
    CALLED();
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(void* handle, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, void* stream, void** params, void** extra) {
    CALLED();
    if (CUresult rc = need_context("cuLaunchKernel")) return rc;
    const Function& f = *static_cast<Function*>(handle);
    const Kernel& k = *f.kernel;
    const std::string shape = format("%s<<<(%u,%u,%u), (%u,%u,%u), %u>>>", k.name.c_str(), gx, gy, gz, bx, by, bz, shared);
    if (extra) return fail(CUDA_ERROR_NOT_SUPPORTED, shape + ": arguments through `extra` are not supported");
    if (!params && !k.param_sizes.empty()) return fail(CUDA_ERROR_INVALID_VALUE, shape + ": no arguments given");
    if (!gx || !gy || !gz || !bx || !by || !bz || gy > 65535 || gz > 65535 || gx > 2147483647u || bx > 1024 || by > 1024 || bz > 64)
        return fail(CUDA_ERROR_INVALID_VALUE, shape + ": grid or block dimensions outside the limits of sm_90");
    const unsigned threads = bx * by * bz;
    if (threads > max_threads(f))
        return fail(threads > MAX_THREADS || threads > f.cubin.max_threads ? CUDA_ERROR_INVALID_VALUE : CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                    format("%s: %u threads per block, but the kernel allows %u (__launch_bounds__ %u, %u registers per "
                           "thread, 64K registers per block)", shape.c_str(), threads, max_threads(f), f.cubin.max_threads,
                           f.cubin.registers));
    const unsigned dynamic_limit = f.max_dynamic_shared >= 0 ? unsigned(f.max_dynamic_shared)
                                                             : SHARED_DEFAULT - std::min(SHARED_DEFAULT, f.cubin.static_shared);
    if (shared > dynamic_limit || f.cubin.static_shared + shared > SHARED_OPTIN)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    format("%s: %u bytes of dynamic shared memory, but the kernel may use %u (static %u bytes; above 48 KiB "
                           "needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)", shape.c_str(), shared, dynamic_limit,
                           f.cubin.static_shared));
    // The driver copies the arguments when the launch is made; pointers must point into live device memory.
    auto args = std::make_shared<std::vector<std::vector<unsigned char>>>(k.param_sizes.size());
    for (size_t i = 0; i < k.param_sizes.size(); ++i) {
        const unsigned char* p = static_cast<const unsigned char*>(params[i]);
        (*args)[i].assign(p, p + k.param_sizes[i]);
        if (k.param_is_pointer[i]) {
            uintptr_t value;
            memcpy(&value, p, sizeof value);
            const std::string bad = check_pointer(k, unsigned(i), value);
            if (!bad.empty()) return fail(CUDA_ERROR_INVALID_VALUE, shape + ": " + bad);
        }
    }
    const Kernel* kernel = &k;
    LaunchShape launch{dim3(gx, gy, gz), dim3(bx, by, bz), shared};
    return submit(*stream_of(stream), Op{k.name, [kernel, launch, args]() -> std::string {
                                              std::vector<void*> pointers(args->size());
                                              std::vector<std::pair<uintptr_t, size_t>> bytes;
                                              for (size_t i = 0; i < args->size(); ++i) {
                                                  pointers[i] = (*args)[i].data();
                                                  bytes.push_back({uintptr_t((*args)[i].data()), (*args)[i].size()});
                                                  if (kernel->param_is_pointer[i]) {
                                                      uintptr_t value;
                                                      memcpy(&value, (*args)[i].data(), sizeof value);
                                                      const std::string bad = check_pointer(*kernel, unsigned(i), value);
                                                      if (!bad.empty()) return bad;
                                                  }
                                              }
                                              return run_kernel(*kernel, launch, pointers.data(), bytes);
                                          }});
}

// ---- graphs ------------------------------------------------------------------------------------------------------
API CUresult cuStreamBeginCapture_v2(void* handle, int mode) {
    CALLED();
    if (!handle) return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture on the legacy default stream");
    Stream* s = stream_of(handle);
    std::lock_guard<std::recursive_mutex> lock(s->mu);
    if (s->capture) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamBeginCapture: the stream is already capturing");
    s->capture = new Graph();
    s->capture_mode = mode;
    s->capture_thread = std::this_thread::get_id();
    s->invalidated.clear();
    return CUDA_SUCCESS;
}
API CUresult cuStreamEndCapture(void* handle, void** graph) {
    CALLED();
    Stream* s = stream_of(handle);
    std::lock_guard<std::recursive_mutex> lock(s->mu);
    if (!s->capture) return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamEndCapture: the stream is not capturing");
    if (s->capture_mode == CAPTURE_THREAD_LOCAL && s->capture_thread != std::this_thread::get_id())
        return fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "cuStreamEndCapture from another thread than the capture's");
    Graph* g = s->capture;
    s->capture = nullptr;
    if (!s->invalidated.empty()) {
        const std::string why = s->invalidated;
        for (uintptr_t a : g->allocations) (void)g_memory.release(a, "the invalidated capture's allocation");
        delete g;
        *graph = nullptr;
        return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "cuStreamEndCapture: the capture was invalidated: " + why);
    }
    *graph = g;
    return CUDA_SUCCESS;
}
API CUresult cuStreamIsCapturing(void* handle, int* status) {
    CALLED();
    Stream* s = stream_of(handle);
    std::lock_guard<std::recursive_mutex> lock(s->mu);
    *status = !s->capture ? 0 : s->invalidated.empty() ? 1 : 2;
    return CUDA_SUCCESS;
}
API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    CALLED();
    if (!graph) return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiate: no graph");
    *exec = new GraphExec{static_cast<Graph*>(graph)->ops};
    return CUDA_SUCCESS;
}
API CUresult cuGraphUpload(void*, void*) {
    CALLED();
    return CUDA_SUCCESS;
}
API CUresult cuGraphLaunch(void* exec, void* stream) {
    CALLED();
    Stream* s = stream_of(stream);
    if (s->capture) return fail(CUDA_ERROR_NOT_SUPPORTED, "cuGraphLaunch into a stream that is being captured");
    for (const Op& op : static_cast<GraphExec*>(exec)->ops)
        if (CUresult rc = enqueue(*s, op)) return rc;
    return settle(*s);
}
API CUresult cuGraphExecDestroy(void* exec) {
    CALLED();
    delete static_cast<GraphExec*>(exec);
    return CUDA_SUCCESS;
}
API CUresult cuGraphDestroy(void* graph) {
    CALLED();
    Graph* g = static_cast<Graph*>(graph);
    if (!g) return CUDA_SUCCESS;
    drain_all();
    for (uintptr_t a : g->allocations) (void)g_memory.release(a, "the graph's allocation");
    delete g;
    return CUDA_SUCCESS;
}

// NVRTC opens libcuda itself when one is loaded and asks for private tables: there are none.
API CUresult cuGetExportTable(const void** table, const void*) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_FOUND;
}

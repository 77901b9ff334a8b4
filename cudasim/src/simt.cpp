// The SIMT executor: runs one kernel launch of a host-compiled twin with CUDA's execution model.
//
// Every CUDA thread of a block is a fiber with its own stack. A fiber runs until it has to wait for others (a
// block barrier, a warp collective) or returns; the block's scheduler then resumes the others, releases a warp
// collective once every lane named by its mask has arrived, and a barrier once every thread of the block has.
// What real hardware would reject or leave undefined is an error naming the kernel, block, thread and source
// line: divergent barriers, a barrier after threads exited, collectives whose lanes disagree on the operation or
// the mask, lanes missing from a mask, deadlock. Shared memory is fresh and NaN-filled for every block, so a read
// of a value nobody wrote shows up in the results.
//
// The checked build of the twins (`-fsanitize=thread` instrumentation, with the hooks defined at the end of this
// file instead of ThreadSanitizer's runtime) reports every access: shared-memory hazards between threads of a
// barrier interval, accesses outside the shared arrays, device accesses outside a live allocation, and
// misaligned accesses that would fault on the GPU.
#include <sys/mman.h>
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "simt.h"

// AddressSanitizer's fiber annotations, present only when the process runs with libasan (the asan build).
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
}

// ---- the context switch (x86-64 System V): push the callee-saved registers, swap stacks, pop, return ----------
extern "C" void cudasim_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl cudasim_switch
.hidden cudasim_switch
.type cudasim_switch,@function
cudasim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size cudasim_switch,.-cudasim_switch
)");

namespace cudasim {

std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[4096];
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

ExecutorOptions& executor_options() {
    static ExecutorOptions options;
    return options;
}

namespace {

std::atomic<uint64_t> g_launches{0}, g_blocks{0}, g_threads{0}, g_barriers{0}, g_collectives{0}, g_races{0},
    g_bad_accesses{0};

// ---- fiber stacks: mapped once per OS thread and reused -------------------------------------------------------
// Each is FIBER_STACK_BYTES long and aligned to it: [header page][guard page][stack ... top]. The header lets the
// running thread find itself from its stack pointer; the guard page makes a stack overflow fault before it
// reaches the header.
constexpr size_t STACK_BYTES = FIBER_STACK_BYTES;
constexpr size_t PAGE = 4096;
constexpr size_t STACK_RESERVED = 2 * PAGE;

struct StackPool {
    std::vector<char*> stacks;
    ~StackPool() {
        for (char* s : stacks) munmap(s, STACK_BYTES);
    }
    void reserve(size_t n) {
        while (stacks.size() < n) {
            // Twice the size, then the aligned part kept.
            void* p = mmap(nullptr, 2 * STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
            if (p == MAP_FAILED) {
                fprintf(stderr, "cudasim: cannot map a fiber stack\n");
                abort();
            }
            const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
            const uintptr_t base = (raw + STACK_BYTES - 1) & ~uintptr_t(STACK_BYTES - 1);
            if (base > raw) munmap(p, base - raw);
            if (base + STACK_BYTES < raw + 2 * STACK_BYTES) munmap(reinterpret_cast<void*>(base + STACK_BYTES), raw + 2 * STACK_BYTES - base - STACK_BYTES);
            mprotect(reinterpret_cast<void*>(base + PAGE), PAGE, PROT_NONE);
            stacks.push_back(reinterpret_cast<char*>(base));
        }
    }
};
thread_local StackPool tl_stacks;

enum class State { Ready, AtBarrier, AtCollective, Done, Failed };

struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;  // its FIBER_STACK_BYTES region, FiberHeader first
    uint3 idx{0, 0, 0};
    unsigned linear = 0;
    State state = State::Ready;
    const char* what = nullptr;  // the collective waited at
    unsigned mask = 0;
    CollectiveFn compute = nullptr;
    void* in = nullptr;
    void* out = nullptr;
    const char* file = nullptr;  // the barrier waited at
    int line = 0;
    void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
};

// ---- shared memory: one arena per OS thread, arrays laid out with red zones between them ------------------------
constexpr size_t SHARED_ARENA_BYTES = 4 << 20;
constexpr size_t RED_ZONE = 64;

struct SharedSlot {
    const void* site;  // null for the dynamic part
    size_t offset, bytes;
    const char* name;
    const char* file;
    int line;
    uint64_t filled_for = 0;  // the block serial it was last poisoned for
};

// Race-checker shadow of one shared byte: the last writer and the last reader within their barrier interval.
struct Shadow {
    uint64_t w_interval, r_interval;
    uint64_t w_warp_sync, r_warp_sync;
    int32_t w_thread, r_thread;  // r_thread -2: several readers
    const void* w_pc;
    const void* r_pc;
};

struct Run {
    const Kernel* kernel = nullptr;
    void* const* params = nullptr;
    LaunchShape shape;
    BlockCoordinates coordinates;
    unsigned threads = 0;
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    char* arena = nullptr;
    size_t arena_used = 0;
    std::vector<SharedSlot> slots;
    uint64_t block_serial = 0;
    uint64_t interval = 0;
    std::vector<uint64_t> warp_sync;  // per warp: the stamp of its last full-warp __syncwarp
    unsigned lane_turn[32];           // the order the lanes of a warp run in, and each lane's place in it
    unsigned lane_place[32];
    unsigned live = 0;                // threads of the block that have not returned
    std::string error;
    uint64_t races = 0;
    std::set<std::pair<const void*, const void*>> reported;
    std::vector<std::pair<uintptr_t, uintptr_t>> known_allocations;  // device ranges checked already
    const SharedSlot* last_slot = nullptr;                             // the array the last access hit
    std::vector<std::pair<uintptr_t, size_t>> param_bytes;
};

thread_local uint64_t tl_stamp = 0;  // source of intervals, warp-sync stamps and block serials on this OS thread
thread_local char* tl_arena = nullptr;
thread_local std::vector<Shadow> tl_shadow;
char* arena() {
    if (!tl_arena) {
        void* p = mmap(nullptr, SHARED_ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "cudasim: cannot map the shared-memory arena\n");
            abort();
        }
        tl_arena = static_cast<char*>(p);
    }
    return tl_arena;
}

// "kernel K, block (x,y,z) thread (x,y,z)" for messages.
std::string where(const Run& r, const Fiber* f) {
    const dim3& b = r.coordinates.block_idx;
    std::string s = format("kernel %s, block (%u,%u,%u)", r.kernel->name.c_str(), b.x, b.y, b.z);
    if (f) s += format(" thread (%u,%u,%u)", f->idx.x, f->idx.y, f->idx.z);
    return s;
}

Fiber* current_fiber() { return static_cast<Fiber*>(fiber_header().fiber); }
Run* current_run() { return static_cast<Run*>(fiber_header().run); }

// file:line of a code address in a twin (twins carry line tables), through addr2line.
std::string source_line(const void* pc) {
    Dl_info info;
    if (!pc || !dladdr(pc, &info) || !info.dli_fname) return "?";
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
             (unsigned long)((const char*)pc - (const char*)info.dli_fbase - 1));
    std::string out;
    if (FILE* f = popen(cmd, "r")) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            line[strcspn(line, "\n")] = 0;
            if (!out.empty()) out += " (inlined into ";
            const char* slash = strrchr(line, '/');
            out += slash ? slash + 1 : line;
        }
        pclose(f);
        size_t opened = 0;
        for (char c : out) opened += c == '(';
        out.append(opened, ')');
    }
    return out.empty() ? "?" : out;
}

// ---- fibers --------------------------------------------------------------------------------------------------------
// A lane that has to wait hands the OS thread straight to the next lane of its warp that can run (the last to
// arrive at a collective completes it first); only a warp that can go no further returns to the scheduler.
// Every switch tells AddressSanitizer (when the process runs with it) which stack comes next.

// The checked build's hooks need the running fiber from any code; only they pay for keeping it in a
// thread-local.
bool g_checked = false;  // set by __tsan_init: a checked twin is loaded
// Initial-exec: read on every access of a checked twin, so no __tls_get_addr call (the library's thread-locals
// are a few hundred bytes, well within the static TLS glibc keeps for libraries loaded later).
__attribute__((tls_model("initial-exec"))) thread_local Run* tl_run = nullptr;
__attribute__((tls_model("initial-exec"))) thread_local Fiber* tl_fiber = nullptr;

// The OS thread's own stack, where the scheduler runs.
thread_local const void* tl_scheduler_bottom = nullptr;
thread_local size_t tl_scheduler_size = 0;
void note_scheduler_stack() {
    if (!__sanitizer_start_switch_fiber || tl_scheduler_bottom) return;
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void* bottom;
        size_t size;
        if (pthread_attr_getstack(&attr, &bottom, &size) == 0) tl_scheduler_bottom = bottom, tl_scheduler_size = size;
        pthread_attr_destroy(&attr);
    }
}

// Switches from `from` (a fiber, or null for the scheduler) to `to` (a fiber, or null for the scheduler); returns
// when `from` runs again.
void switch_fiber(Fiber* from, Fiber* to, Run* r) {
    void** save = from ? &from->sp : &r->scheduler_sp;
    void* target = to ? to->sp : r->scheduler_sp;
    if (g_checked) tl_fiber = to;
    void* fake = nullptr;
    if (__sanitizer_start_switch_fiber) {
        // A lane that returned never runs on this stack again: its fake stack goes (a null save slot).
        void** save_fake = !from ? &fake : from->state == State::Done ? nullptr : &from->fake_stack;
        if (to)
            __sanitizer_start_switch_fiber(save_fake, to->stack + STACK_RESERVED, STACK_BYTES - STACK_RESERVED);
        else
            __sanitizer_start_switch_fiber(save_fake, tl_scheduler_bottom, tl_scheduler_size);
    }
    cudasim_switch(save, target);
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(from ? from->fake_stack : fake, nullptr, nullptr);
    if (g_checked) tl_fiber = from;
}

// The first lane of warp `w`, from place `from` in the run order on, that can run; null if none.
Fiber* next_ready(Run& r, unsigned w, unsigned from) {
    const unsigned lanes = std::min(32u, r.threads - w * 32);
    for (unsigned p = from; p < 32; ++p) {
        const unsigned l = r.lane_turn[p];
        if (l < lanes && r.fibers[w * 32 + l].state == State::Ready) return &r.fibers[w * 32 + l];
    }
    return nullptr;
}

bool release_warp(Run& r, unsigned w);

// `f` has just stopped (waiting, or returned): runs the next lane of its warp that can, else the scheduler.
// Returns when `f` runs again (never, if it returned).
void pass_on(Fiber* f, Run* r) {
    const unsigned w = f->linear / 32;
    Fiber* next = nullptr;
    if (r->error.empty()) {
        next = next_ready(*r, w, r->lane_place[f->linear & 31] + 1);
        if (!next && release_warp(*r, w)) next = next_ready(*r, w, 0);
        if (!r->error.empty()) next = nullptr;
    }
    if (next == f) return;  // the collective it arrived at last is complete: it goes on
    switch_fiber(f, next, r);
}

// Ends the calling CUDA thread's block with an error; never returns.
[[noreturn]] void fail(const std::string& message) {
    Fiber* f = current_fiber();
    Run* r = current_run();
    if (r->error.empty()) r->error = where(*r, f) + ": " + message;
    f->state = State::Failed;
    switch_fiber(f, nullptr, r);
    __builtin_unreachable();
}

void fiber_main() {
    if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
    Run* r = current_run();
    r->kernel->thunk(r->params);
    Fiber* f = current_fiber();
    f->state = State::Done;
    --r->live;
    pass_on(f, r);
    __builtin_unreachable();
}

void start_fiber(Run& r, Fiber& f) {
    char* usable = f.stack + STACK_RESERVED;
    if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(usable, STACK_BYTES - STACK_RESERVED);
    FiberHeader* h = reinterpret_cast<FiberHeader*>(f.stack);
    h->thread_idx = &f.idx;
    h->block = &r.coordinates;
    h->fiber = &f;
    h->run = &r;
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + STACK_BYTES) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                  // the return address fiber_main never uses
    *--sp = reinterpret_cast<void*>(&fiber_main);     // popped by cudasim_switch's ret
    for (int i = 0; i < 6; ++i) *--sp = nullptr;      // rbp rbx r12 r13 r14 r15
    f.sp = sp;
    f.state = State::Ready;
}

uint64_t next_random(uint64_t& state) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
}

void order(std::vector<unsigned>& v, Order how, uint64_t& rng) {
    if (how == Order::Forward && (v.empty() || v.back() == v.size() - 1)) return;  // already in order
    for (unsigned i = 0; i < v.size(); ++i) v[i] = how == Order::Reverse ? unsigned(v.size() - 1 - i) : i;
    if (how == Order::Random)
        for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(rng) % i]);
}

// Lanes of warp `w` that exist in a block of `threads` threads, as a mask.
unsigned existing_lanes(unsigned w, unsigned threads) {
    const unsigned n = std::min(32u, threads - w * 32);
    return n == 32 ? 0xffffffffu : (1u << n) - 1;
}

// Completes warp `w`'s pending collective once every lane its mask names has arrived; reports collectives real
// hardware would not complete. Returns whether it released the warp.
bool release_warp(Run& r, unsigned w) {
    {
        Fiber* lanes = &r.fibers[w * 32];
        const unsigned exist = existing_lanes(w, r.threads);
        int first = -1;
        for (unsigned i = 0; i < 32 && (exist >> i & 1); ++i)
            if (lanes[i].state == State::AtCollective) {
                first = int(i);
                break;
            }
        if (first < 0) return false;
        const Fiber& f0 = lanes[first];
        bool complete = true;
        for (unsigned i = 0; i < 32; ++i) {
            if (!(f0.mask >> i & 1)) continue;
            if (!(exist >> i & 1)) {
                r.error = where(r, &lanes[first]) + format(": %s with mask 0x%08x names lane %u, which does not exist in a block of %u "
                                           "threads", f0.what, f0.mask, i, r.threads);
                return false;
            }
            const Fiber& f = lanes[i];
            if (f.state == State::Done) {
                r.error = where(r, &lanes[first]) + format(": %s with mask 0x%08x names lane %u, which has exited", f0.what, f0.mask, i);
                return false;
            }
            if (f.state != State::AtCollective) {
                complete = false;
                continue;
            }
            if ((f.what != f0.what && strcmp(f.what, f0.what) != 0) || f.mask != f0.mask) {
                r.error = where(r, &lanes[i]) + format(": divergent warp collectives: lane %u is at %s (mask 0x%08x), lane %d at %s "
                                           "(mask 0x%08x)", i, f.what, f.mask, first, f0.what, f0.mask);
                return false;
            }
        }
        if (!complete) return false;
        void* in[32] = {};
        void* out[32] = {};
        for (unsigned i = 0; i < 32; ++i)
            if (f0.mask >> i & 1) in[i] = lanes[i].in, out[i] = lanes[i].out;
        // The compute functions name the warp's first lane in their messages.
        Fiber* const running = tl_fiber;
        tl_fiber = &lanes[first];
        const unsigned mask = f0.mask;
        const bool full_sync = f0.compute == nullptr && mask == exist;
        if (f0.compute) f0.compute(in, out, mask);
        tl_fiber = running;
        if (!r.error.empty()) return false;
        if (full_sync) r.warp_sync[w] = ++tl_stamp;
        for (unsigned i = 0; i < 32; ++i)
            if (mask >> i & 1) lanes[i].state = State::Ready;
        ++g_collectives;
        return true;
    }
}

std::string describe_waits(const Run& r) {
    std::string s;
    unsigned shown = 0;
    for (const Fiber& f : r.fibers) {
        if (shown == 8) {
            s += "\n    ...";
            break;
        }
        if (f.state == State::AtBarrier)
            s += format("\n    thread %u waits at __syncthreads (%s:%d)", f.linear, f.file, f.line);
        else if (f.state == State::AtCollective)
            s += format("\n    thread %u waits at %s (mask 0x%08x)", f.linear, f.what, f.mask);
        else
            continue;
        ++shown;
    }
    return s;
}

void run_block(Run& r) {
    r.block_serial = ++tl_stamp;
    r.interval = ++tl_stamp;
    std::fill(r.warp_sync.begin(), r.warp_sync.end(), 0);
    for (SharedSlot& s : r.slots)
        if (!s.site) {  // the dynamic part is poisoned at block start; static arrays at their declaration
            memset(r.arena + s.offset, executor_options().shared_fill_nan ? 0xff : 0, s.bytes);
            s.filled_for = r.block_serial;
        }
    for (unsigned i = 0; i < r.threads; ++i) {
        Fiber& f = r.fibers[i];
        f.linear = i;
        f.idx = {i % r.shape.block.x, (i / r.shape.block.x) % r.shape.block.y, i / (r.shape.block.x * r.shape.block.y)};
        start_fiber(r, f);
    }
    // Warp by warp: a warp runs its lanes until each waits (for a collective, which completes as soon as its
    // last lane arrives, or at a barrier) or exits; the block barrier opens once every warp is there.
    const unsigned warps = (r.threads + 31) / 32;
    std::vector<unsigned> warp_turn(warps), lanes(32);
    uint64_t rng = executor_options().seed * 0x9e3779b97f4a7c15ull + r.block_serial;
    r.live = r.threads;
    while (r.live) {
        order(warp_turn, executor_options().thread_order, rng);
        bool progressed = false;
        for (unsigned w : warp_turn) {
            order(lanes, executor_options().thread_order, rng);
            for (unsigned p = 0; p < 32; ++p) r.lane_turn[p] = lanes[p], r.lane_place[lanes[p]] = p;
            Fiber* first = next_ready(r, w, 0);
            if (!first) continue;
            switch_fiber(nullptr, first, &r);
            progressed = true;
            if (!r.error.empty()) return;
        }
        unsigned at_barrier = 0, done = 0;
        const Fiber* first = nullptr;
        for (const Fiber& f : r.fibers) {
            if (f.state == State::AtBarrier) {
                ++at_barrier;
                if (!first) first = &f;
            }
            done += f.state == State::Done;
        }
        if (at_barrier && at_barrier + done == r.threads) {
            for (const Fiber& f : r.fibers)
                if (f.state == State::AtBarrier && (f.line != first->line || strcmp(f.file, first->file) != 0)) {
                    r.error = where(r, &f) + format(": divergent barriers: this thread waits at __syncthreads %s:%d, "
                                               "thread %u at %s:%d", f.file, f.line, first->linear, first->file, first->line);
                    return;
                }
            if (done) {
                r.error = where(r, first) + format(": __syncthreads at %s:%d reached after %u thread(s) of the block returned "
                                           "(undefined behaviour: the barrier counts every thread)", first->file,
                                           first->line, done);
                return;
            }
            for (Fiber& f : r.fibers) f.state = State::Ready;
            r.interval = ++tl_stamp;
            ++g_barriers;
            progressed = true;
        }
        if (!progressed && r.live) {
            r.error = where(r, nullptr) + format(": deadlock: %u thread(s) at a barrier, %u exited, the rest at warp collectives "
                                       "that cannot complete:", at_barrier, done) + describe_waits(r);
            return;
        }
    }
}

}  // namespace

// ---- the calls twins make --------------------------------------------------------------------------------------
void syncthreads(const char* file, int line) {
    Fiber* f = current_fiber();
    f->state = State::AtBarrier;
    f->file = file;
    f->line = line;
    pass_on(f, current_run());
}

void warp_collective(const char* what, unsigned mask, CollectiveFn compute, void* in, void* out) {
    Fiber* f = current_fiber();
    const unsigned lane = f->linear & 31;
    if (!(mask >> lane & 1)) fail(format("%s with mask 0x%08x is executed by lane %u, which the mask leaves out", what, mask, lane));
    f->what = what;
    f->mask = mask;
    f->compute = compute;
    f->in = in;
    f->out = out;
    f->state = State::AtCollective;
    pass_on(f, current_run());
}

void syncwarp(unsigned mask, const char*, int) { warp_collective("__syncwarp", mask, nullptr, nullptr, nullptr); }

void shuffle_compute(void* const* in, void* const* out, unsigned mask) {
    for (int lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1)) continue;
        const ShuffleIn* a = static_cast<const ShuffleIn*>(in[lane]);
        const int w = a->width;
        if (w < 1 || w > 32 || (w & (w - 1))) {
            tl_run->error = where(*tl_run, tl_fiber) + format(": shuffle width %d is not a power of two up to 32", w);
            return;
        }
        const int base = lane & ~(w - 1);
        int src;
        switch (a->mode) {
            case SHFL_IDX: src = base + (a->operand & (w - 1)); break;
            case SHFL_BFLY: src = lane ^ a->operand; if (src >= base + w) src = lane; break;
            case SHFL_UP: src = lane - a->operand; if (src < base) src = lane; break;
            default: src = lane + a->operand; if (src >= base + w) src = lane; break;
        }
        if (src < 0 || src > 31 || !(mask >> src & 1)) {
            tl_run->error = where(*tl_run, tl_fiber) + format(": lane %d shuffles from lane %d, which is not in the mask 0x%08x (undefined "
                                             "value)", lane, src, mask);
            return;
        }
        *static_cast<uint64_t*>(out[lane]) = static_cast<const ShuffleIn*>(in[src])->bits;
    }
}

namespace {
void ballot_compute(void* const* in, void* const* out, unsigned mask) {
    unsigned bits = 0;
    for (int lane = 0; lane < 32; ++lane)
        if ((mask >> lane & 1) && *static_cast<const int*>(in[lane])) bits |= 1u << lane;
    for (int lane = 0; lane < 32; ++lane)
        if (mask >> lane & 1) *static_cast<unsigned*>(out[lane]) = bits;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32. Fragment layout from the PTX ISA ("Matrix fragments for
// mma.m16n8k16 with floating point type"), g = lane / 4, t = lane % 4, 16-bit elements numbered from the low half:
//   A 16x16 (row major), 8 elements in a0..a3: element i at row g + 8 * (i % 4 >= 2), col 2t + i % 2 + 8 * (i >= 4)
//   B 16x8 (column major), 4 elements in b0, b1: element i at row 2t + i % 2 + 8 * (i >= 2), col g
//   C, D 16x8: element i at row g + 8 * (i >= 2), col 2t + i % 2
struct MmaOperands {
    unsigned a[4], b[2];
    float c[4];
};
float bf16_value(unsigned bits) {
    const unsigned u = bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// Built for AVX2 as well as the baseline, the better one chosen when the library loads (it is most of the time
// the tensor-core kernels take here).
__attribute__((target_clones("avx2", "default"))) void mma_compute(void* const* in, void* const* out, unsigned mask) {
    if (mask != 0xffffffffu) {
        tl_run->error = where(*tl_run, tl_fiber) + format(": mma.sync with mask 0x%08x: it needs all 32 lanes", mask);
        return;
    }
    float A[16][16], B[16][8];
    double D[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const MmaOperands* o = static_cast<const MmaOperands*>(in[lane]);
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 8; ++i)
            A[g + 8 * ((i & 3) >= 2)][2 * t + (i & 1) + 8 * (i >= 4)] = bf16_value(o->a[i >> 1] >> (16 * (i & 1)) & 0xffff);
        for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >= 2)][g] = bf16_value(o->b[i >> 1] >> (16 * (i & 1)) & 0xffff);
        for (int i = 0; i < 4; ++i) D[g + 8 * (i >= 2)][2 * t + (i & 1)] = o->c[i];
    }
    // Products of bf16 values are exact in double; each sum runs over k in order from C and is rounded to f32
    // once. The hardware's order and intermediate rounding are unspecified; the tests' bf16 tolerances cover
    // the difference. (Loop order chosen so the inner loop vectorises.)
    for (int k = 0; k < 16; ++k)
        for (int row = 0; row < 16; ++row) {
            const double a = A[row][k];
            for (int col = 0; col < 8; ++col) D[row][col] += a * double(B[k][col]);
        }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        float* d = static_cast<float*>(out[lane]);
        for (int i = 0; i < 4; ++i) d[i] = float(D[g + 8 * (i >= 2)][2 * t + (i & 1)]);
    }
}
}  // namespace

unsigned ballot(unsigned mask, int predicate) {
    unsigned bits = 0;
    warp_collective("__ballot_sync", mask, ballot_compute, &predicate, &bits);
    return bits & mask;
}

namespace ptx {
void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float& d0, float& d1, float& d2, float& d3, unsigned a0,
                                                        unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                                        unsigned b1, float c0, float c1, float c2, float c3) {
    MmaOperands in{{a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3}};
    float d[4];
    warp_collective("mma.sync.m16n8k16.bf16", 0xffffffffu, mma_compute, &in, d);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}
}  // namespace ptx

// ---- shared memory -------------------------------------------------------------------------------------------------
namespace {
// Places `bytes` in the arena after a red zone, at an address aligned to `align` but not to 2 * align, so that
// an access assuming more alignment than the declaration gives is misaligned here too.
size_t place(Run& r, size_t bytes, size_t align) {
    size_t offset = r.arena_used + RED_ZONE;
    offset = (offset + align - 1) / align * align;
    if (align < 4096 && (offset / align) % 2 == 0) offset += align;
    if (offset + bytes + RED_ZONE > SHARED_ARENA_BYTES) fail("shared memory of the block exceeds the simulator's 4 MiB arena");
    r.arena_used = offset + bytes;
    return offset;
}
}  // namespace

void* shared_array(const void* site, size_t bytes, size_t align, const char* name, const char* file, int line) {
    Run& r = *current_run();
    for (SharedSlot& s : r.slots)
        if (s.site == site) {
            if (s.filled_for != r.block_serial) {
                memset(r.arena + s.offset, executor_options().shared_fill_nan ? 0xff : 0, s.bytes);
                s.filled_for = r.block_serial;
            }
            return r.arena + s.offset;
        }
    const size_t offset = place(r, bytes, align < 16 ? 16 : align);
    r.slots.push_back({site, offset, bytes, name, file, line, r.block_serial});
    r.last_slot = nullptr;  // the vector may have moved
    memset(r.arena + offset, executor_options().shared_fill_nan ? 0xff : 0, bytes);
    if (g_checked && tl_shadow.size() < r.arena_used) {
        tl_shadow.resize(r.arena_used);  // new entries are zero: interval 0 is never current
    }
    return r.arena + offset;
}

void* dynamic_shared(size_t) {
    Run& r = *current_run();
    for (SharedSlot& s : r.slots)
        if (!s.site) return r.arena + s.offset;
    fail("extern __shared__ is used but the launch asked for 0 bytes of dynamic shared memory");
}

// ---- a launch ------------------------------------------------------------------------------------------------------
std::string run_kernel(const Kernel& kernel, const LaunchShape& shape, void* const* params,
                       const std::vector<std::pair<uintptr_t, size_t>>& param_bytes) {
    note_scheduler_stack();
    Run r;
    r.kernel = &kernel;
    r.params = params;
    r.shape = shape;
    r.threads = shape.block.x * shape.block.y * shape.block.z;
    r.param_bytes = param_bytes;
    r.arena = arena();
    r.warp_sync.assign((r.threads + 31) / 32, 0);
    tl_stacks.reserve(r.threads);
    r.fibers.resize(r.threads);
    for (unsigned i = 0; i < r.threads; ++i) r.fibers[i].stack = tl_stacks.stacks[i];
    if (shape.dynamic_shared) {
        const size_t offset = place(r, shape.dynamic_shared, 16);
        r.slots.push_back({nullptr, offset, shape.dynamic_shared, "extern __shared__", "(dynamic)", 0, 0});
        if (g_checked && tl_shadow.size() < r.arena_used) tl_shadow.resize(r.arena_used);
    }
    Run* outer = tl_run;
    tl_run = &r;
    const uint64_t blocks = uint64_t(shape.grid.x) * shape.grid.y * shape.grid.z;
    const ExecutorOptions& opt = executor_options();
    uint64_t rng = opt.seed * 0xd1b54a32d192ed03ull + 1;
    std::vector<unsigned> permutation;
    if (opt.block_order == Order::Random) {
        permutation.resize(blocks);
        order(permutation, Order::Random, rng);
    }
    for (uint64_t b = 0; b < blocks && r.error.empty(); ++b) {
        const uint64_t i = opt.block_order == Order::Reverse ? blocks - 1 - b
                           : opt.block_order == Order::Random ? permutation[b]
                                                              : b;
        r.coordinates.grid = shape.grid;
        r.coordinates.block = shape.block;
        r.coordinates.block_idx = dim3(unsigned(i % shape.grid.x), unsigned(i / shape.grid.x % shape.grid.y),
                                  unsigned(i / shape.grid.x / shape.grid.y));
        run_block(r);
        ++g_blocks;
        g_threads += r.threads;
    }
    tl_run = outer;
    tl_fiber = nullptr;
    ++g_launches;
    if (r.error.empty() && r.races)
        r.error = format("kernel %s: %llu shared-memory hazard(s) (reported above)", kernel.name.c_str(),
                         (unsigned long long)r.races);
    return r.error;
}

ExecutorStats executor_stats() {
    return {g_launches, g_blocks, g_threads, g_barriers, g_collectives, g_races, g_bad_accesses};
}

// ---- the checked build: every access of a twin, through ThreadSanitizer's instrumentation hooks ------------------
namespace {
void race_report(const char* kind, const SharedSlot& s, size_t index, int other, const void* pc, const void* other_pc) {
    Run& r = *tl_run;
    ++r.races;
    ++g_races;
    if (!r.reported.insert({pc, other_pc}).second) return;  // one report per pair of source lines
    const std::string who = other == -2 ? std::string("several threads") : format("thread %d", other);
    fprintf(stderr, "cudasim: %s hazard on __shared__ %s byte %zu (%s:%d), %s, barrier interval %llu:\n"
            "    thread %u at %s\n    %s at %s\n",
            kind, s.name, index, s.file, s.line, where(r, tl_fiber).c_str(), (unsigned long long)r.interval, tl_fiber->linear,
            source_line(pc).c_str(), who.c_str(), source_line(other_pc).c_str());
}

void bad_access(const std::string& what, const void* pc) {
    ++g_bad_accesses;
    fail(what + " at " + source_line(pc));
}

void shared_access(Run& r, uintptr_t address, size_t n, bool write, const void* pc) {
    const size_t offset = address - reinterpret_cast<uintptr_t>(r.arena);
    const SharedSlot* slot = r.last_slot;
    if (!slot || offset < slot->offset || offset + n > slot->offset + slot->bytes) {
        slot = nullptr;
        for (const SharedSlot& s : r.slots)
            if (offset >= s.offset && offset + n <= s.offset + s.bytes) slot = &s;
        r.last_slot = slot;
    }
    if (!slot) {
        const SharedSlot* near = nullptr;
        for (const SharedSlot& s : r.slots)
            if (!near || (s.offset <= offset && s.offset > near->offset)) near = &s;
        std::string what = format("%s of %zu bytes outside every __shared__ array", write ? "write" : "read", n);
        if (near && offset >= near->offset)
            what += format(" (%zd bytes past the start of %s, which holds %zu)", ssize_t(offset - near->offset),
                           near->name, near->bytes);
        bad_access(what, pc);
    }
    if (!g_checked) return;
    const int me = int(tl_fiber->linear);
    const unsigned warp = tl_fiber->linear / 32;
    const uint64_t sync = r.warp_sync[warp];
    for (size_t i = 0; i < n; ++i) {
        Shadow& sh = tl_shadow[offset + i];
        // Ordered when a barrier separates the accesses, or when both threads are in one warp and a full-warp
        // __syncwarp came after the earlier one.
        auto ordered = [&](int other, uint64_t other_sync) {
            return other == me || (other >= 0 && unsigned(other) / 32 == warp && other_sync != sync);
        };
        if (write) {
            if (sh.w_interval == r.interval && !ordered(sh.w_thread, sh.w_warp_sync))
                race_report("write-after-write", *slot, offset + i - slot->offset, sh.w_thread, pc, sh.w_pc);
            else if (sh.r_interval == r.interval && !ordered(sh.r_thread, sh.r_warp_sync))
                race_report("write-after-read", *slot, offset + i - slot->offset, sh.r_thread, pc, sh.r_pc);
            sh.w_interval = r.interval, sh.w_thread = me, sh.w_pc = pc, sh.w_warp_sync = sync;
        } else {
            if (sh.w_interval == r.interval && !ordered(sh.w_thread, sh.w_warp_sync))
                race_report("read-after-write", *slot, offset + i - slot->offset, sh.w_thread, pc, sh.w_pc);
            if (sh.r_interval == r.interval && sh.r_thread != me)
                sh.r_thread = -2;
            else
                sh.r_interval = r.interval, sh.r_thread = me, sh.r_pc = pc, sh.r_warp_sync = sync;
        }
    }
}

void device_access(Run& r, uintptr_t address, size_t n, bool write, const void* pc) {
    for (const auto& [begin, end] : r.known_allocations)
        if (address >= begin && address + n <= end) return;
    uintptr_t begin, end;
    std::string why;
    if (!find_allocation(address, n, &begin, &end, &why)) {
        // Name the kernel arguments that point into the allocation the access ran off.
        for (size_t i = 0; i < r.kernel->param_sizes.size() && begin < end; ++i) {
            if (!r.kernel->param_is_pointer[i]) continue;
            uintptr_t v;
            memcpy(&v, r.params[i], sizeof v);
            if (v >= begin && v <= end)
                why += format("; argument %zu (%s) points into that allocation", i,
                              i < r.kernel->param_names.size() ? r.kernel->param_names[i].c_str() : "?");
        }
        bad_access(format("%s of %zu bytes at device address 0x%lx: %s", write ? "write" : "read", n,
                          (unsigned long)address, why.c_str()), pc);
    }
    if (r.known_allocations.size() < 64) r.known_allocations.push_back({begin, end});
}

inline void on_access(void* p, size_t n, bool write, const void* pc) {
    Run* r = tl_run;
    if (!r || !tl_fiber) return;  // not inside a kernel (a twin's static initialisation)
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    if (n > 1 && n <= 16 && !(n & (n - 1)) && (address & (n - 1)))
        bad_access(format("misaligned %zu-byte %s at 0x%lx (the GPU faults: CUDA_ERROR_MISALIGNED_ADDRESS)", n,
                          write ? "write" : "read", (unsigned long)address), pc);
    if (address - reinterpret_cast<uintptr_t>(r->arena) < SHARED_ARENA_BYTES)
        shared_access(*r, address, n, write, pc);
    else if (in_device_range(address))
        device_access(*r, address, n, write, pc);
}

inline void on_range(void* p, size_t n, bool write, const void* pc) {
    // A range (memcpy, memset): checked as one access of its length, without the alignment rule.
    Run* r = tl_run;
    if (!r || !tl_fiber || !n) return;
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    if (address - reinterpret_cast<uintptr_t>(r->arena) < SHARED_ARENA_BYTES)
        shared_access(*r, address, n, write, pc);
    else if (in_device_range(address))
        device_access(*r, address, n, write, pc);
}
}  // namespace
}  // namespace cudasim

#define CUDASIM_HOOKS(n)                                                                                      \
    extern "C" void __tsan_read##n(void* a) { cudasim::on_access(a, n, false, __builtin_return_address(0)); }    \
    extern "C" void __tsan_write##n(void* a) { cudasim::on_access(a, n, true, __builtin_return_address(0)); }    \
    extern "C" void __tsan_unaligned_read##n(void* a) {                                                          \
        cudasim::on_access(a, n, false, __builtin_return_address(0));                                           \
    }                                                                                                           \
    extern "C" void __tsan_unaligned_write##n(void* a) { cudasim::on_access(a, n, true, __builtin_return_address(0)); } \
    extern "C" void __tsan_volatile_read##n(void* a) { cudasim::on_access(a, n, false, __builtin_return_address(0)); } \
    extern "C" void __tsan_volatile_write##n(void* a) { cudasim::on_access(a, n, true, __builtin_return_address(0)); }
CUDASIM_HOOKS(1)
CUDASIM_HOOKS(2)
CUDASIM_HOOKS(4)
CUDASIM_HOOKS(8)
CUDASIM_HOOKS(16)
#undef CUDASIM_HOOKS
extern "C" void __tsan_init() { cudasim::g_checked = true; }
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_read_range(void* a, unsigned long n) { cudasim::on_range(a, n, false, __builtin_return_address(0)); }
extern "C" void __tsan_write_range(void* a, unsigned long n) { cudasim::on_range(a, n, true, __builtin_return_address(0)); }
extern "C" void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
    cudasim::on_range(const_cast<void*>(s), n, false, __builtin_return_address(0));
    cudasim::on_range(d, n, true, __builtin_return_address(0));
    return memcpy(d, s, n);
}
extern "C" void* __tsan_memmove(void* d, const void* s, unsigned long n) {
    cudasim::on_range(const_cast<void*>(s), n, false, __builtin_return_address(0));
    cudasim::on_range(d, n, true, __builtin_return_address(0));
    return memmove(d, s, n);
}
extern "C" void* __tsan_memset(void* d, int c, unsigned long n) {
    cudasim::on_range(d, n, true, __builtin_return_address(0));
    return memset(d, c, n);
}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}

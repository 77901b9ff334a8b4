// The SIMT executor's interface to the stand-in driver (both live in libcuda.so of the simulator).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../include/cudasim_kernel.h"

namespace cudasim {

// printf into a std::string (messages of the executor and the driver).
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// One kernel of a loaded twin library, with what the cubin says about it (filled in at module load).
struct Kernel {
    std::string name;
    std::string twin;  // the twin library it came from
    KernelThunk thunk = nullptr;
    std::vector<unsigned> param_sizes;
    std::vector<bool> param_is_pointer;
    std::vector<std::string> param_names;
};

// What the cubin NVRTC compiled says about one kernel: the limits a launch is held to.
struct CubinKernel {
    unsigned registers = 0;       // EIATTR_REGCOUNT
    unsigned static_shared = 0;   // .nv.shared.<kernel>, without the 1 KiB the hardware reserves per block
    unsigned max_threads = 1024;  // __launch_bounds__ (EIATTR_MAX_THREADS), else the device's 1024
    std::vector<unsigned> param_offsets, param_sizes;  // EIATTR_KPARAM_INFO, by ordinal
};

struct LaunchShape {
    dim3 grid, block;
    unsigned dynamic_shared = 0;
};

enum class Order { Forward, Reverse, Random };

// Settings of the executor, from SGDM_SIM_* through the engine (see cudasim/README.md).
struct ExecutorOptions {
    Order thread_order = Order::Forward;
    Order block_order = Order::Forward;
    uint64_t seed = 1;
    bool shared_fill_nan = true;
};
ExecutorOptions& executor_options();

// Runs every block of one launch on the calling OS thread. `params` follows cuLaunchKernel (one pointer per
// parameter, to its value); `param_bytes` is the range holding those values (the checked build allows kernels to
// read it). Returns an empty string, or what went wrong, with the kernel, block and thread.
std::string run_kernel(const Kernel& kernel, const LaunchShape& shape, void* const* params,
                       const std::vector<std::pair<uintptr_t, size_t>>& param_bytes);

// Counters over the life of the process (for `sgdm info` and the tests).
struct ExecutorStats {
    uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0, races = 0, bad_accesses = 0;
};
ExecutorStats executor_stats();

// Device memory, as the driver owns it: the checked build's hooks ask it about every access that falls in the
// device address range.
bool in_device_range(uintptr_t address);
// True when [address, address + bytes) lies inside one live allocation, whose range is then [*begin, *end);
// otherwise `why` says what is wrong with the access (past the end of which allocation, freed, never allocated)
// and [*begin, *end) is the allocation it ran off or into (empty if none).
bool find_allocation(uintptr_t address, size_t bytes, uintptr_t* begin, uintptr_t* end, std::string* why);

}  // namespace cudasim

// A CPU emulator of the CUDA C subset that slimnp/kernels/gpu.py uses, so that
// its kernels run (slowly, exactly) on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; the
// block's fibers run one after another on one OS thread, each until it
// reaches __syncthreads() or returns.  When all have, the barrier is passed
// and the next round starts; a block in which some threads returned while
// others wait at a barrier is reported as an error (undefined behaviour on a
// GPU).  Blocks run one after another, so `__shared__` (a `static` local) is
// the current block's shared memory, and atomicAdd needs no atomics.
//
// What it checks: indexing, launch geometry, barrier placement, argument
// types (gpu_emu.py compares each argument with the kernel's C signature).
// What it cannot: races between threads that a GPU would interleave, and
// the speed.
#pragma once
#include <math.h>
#include <string.h>
#include <ucontext.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using std::isfinite;

struct dim3 {
    unsigned x, y, z;
};

namespace emu {
inline dim3 blockIdx_, threadIdx_, blockDim_, gridDim_;
}  // namespace emu

#define blockIdx emu::blockIdx_
#define threadIdx emu::threadIdx_
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline double __longlong_as_double(long long i) {
    double d;
    memcpy(&d, &i, sizeof d);
    return d;
}
template <typename T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}

namespace emu {
enum State { READY, AT_BARRIER, DONE };
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state;
};
constexpr size_t STACK_BYTES = 64 * 1024;
inline std::vector<Fiber> fibers;
inline ucontext_t scheduler;
inline int current = 0;
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;
inline std::string error;
inline int reverse_order = 0;  // run a round's fibers from the last thread to the first

inline void trampoline() {
    body(body_arg);
    fibers[current].state = DONE;
    swapcontext(&fibers[current].ctx, &scheduler);
}

inline void syncthreads() {
    fibers[current].state = AT_BARRIER;
    swapcontext(&fibers[current].ctx, &scheduler);
}

// Run body(arg) as every thread of every block; 0 on success.
inline int run(dim3 grid, dim3 block, void (*fn)(void*), void* arg) {
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.y > 65535 || grid.z > 65535) {
        error = "invalid launch geometry (block size must be 1..1024, grid.y/z <= 65535)";
        return 1;
    }
    body = fn;
    body_arg = arg;
    gridDim_ = grid;
    blockDim_ = block;
    if (fibers.size() < nthreads) fibers.resize(nthreads);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx_ = {bx, by, bz};
                for (unsigned i = 0; i < nthreads; ++i) {
                    Fiber& f = fibers[i];
                    if (f.stack.size() != STACK_BYTES) f.stack.resize(STACK_BYTES);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, trampoline, 0);
                    f.state = READY;
                }
                for (;;) {
                    for (unsigned r = 0; r < nthreads; ++r) {
                        const unsigned i = reverse_order ? nthreads - 1 - r : r;
                        if (fibers[i].state != READY) continue;
                        current = (int)i;
                        threadIdx_ = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
                        swapcontext(&scheduler, &fibers[i].ctx);
                    }
                    unsigned waiting = 0, done = 0;
                    for (unsigned i = 0; i < nthreads; ++i) {
                        waiting += fibers[i].state == AT_BARRIER;
                        done += fibers[i].state == DONE;
                    }
                    if (done == nthreads) break;
                    if (done) {
                        error = "__syncthreads() reached by only part of a block (the rest returned)";
                        return 1;
                    }
                    for (unsigned i = 0; i < nthreads; ++i) fibers[i].state = READY;
                }
            }
    return 0;
}

// The kernel's C signature as letters: p pointer, q long long, i int, f float, d double.
template <typename A>
constexpr char code() {
    if constexpr (std::is_pointer_v<A>) return 'p';
    else if constexpr (std::is_same_v<A, long long>) return 'q';
    else if constexpr (std::is_same_v<A, int>) return 'i';
    else if constexpr (std::is_same_v<A, float>) return 'f';
    else if constexpr (std::is_same_v<A, double>) return 'd';
    else return '?';
}
template <typename... A>
std::string signature(void (*)(A...)) {
    return std::string{code<A>()...};
}

// args[i] points at the i-th argument's value, as in cuLaunchKernel.
template <typename... A>
struct Call {
    void (*kernel)(A...);
    void** args;
    template <size_t... I>
    void invoke(std::index_sequence<I...>) {
        kernel(*static_cast<A*>(args[I])...);
    }
    static void thunk(void* self) {
        static_cast<Call*>(self)->invoke(std::index_sequence_for<A...>{});
    }
};
template <typename... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, void** args) {
    Call<A...> call{kernel, args};
    return run(grid, block, &Call<A...>::thunk, &call);
}
}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }

extern "C" const char* emu_error() { return emu::error.c_str(); }
extern "C" void emu_set_reverse(int r) { emu::reverse_order = r; }

// One exported launcher and signature per kernel instantiation.
#define EMU_EXPORT(NAME, T)                                                                    \
    extern "C" int emu_launch_##NAME##_##T(unsigned gx, unsigned gy, unsigned gz, unsigned bx,   \
                                           unsigned by, unsigned bz, void** args) {            \
        return emu::launch(&NAME<T>, dim3{gx, gy, gz}, dim3{bx, by, bz}, args);                \
    }                                                                                          \
    extern "C" const char* emu_sig_##NAME##_##T() {                                             \
        static const std::string s = emu::signature(&NAME<T>);                                  \
        return s.c_str();                                                                      \
    }

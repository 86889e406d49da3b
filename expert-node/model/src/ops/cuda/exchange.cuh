// Copies between a routed exchange buffer and the GPU that fills or reads it (ops/cuda/routed.rs,
// ops/cuda/pass.rs): two spans of u32 words in one launch, every word its own load, so a batch-1
// layer's top-k and hidden states (a few KiB, read over NVLink on a node) cost one kernel's
// latency instead of two copy-engine transfers in series.
extern "C" __global__ void exchange_copy_u32(const uint32_t* __restrict__ src0, uint32_t* __restrict__ dst0, uint32_t n0,
                                             const uint32_t* __restrict__ src1, uint32_t* __restrict__ dst1, uint32_t n1) {
    const uint32_t total = n0 + n1;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        if (i < n0) dst0[i] = src0[i];
        else dst1[i - n0] = src1[i - n0];
    }
}

// A routed pass's layer on a node (ops/cuda/pass.rs): waits until the coordinator's ready flag
// (in its GPU memory, read over NVLink) is 1, copies the two spans in and clears the flag — one
// launch where a stream wait, a flag write and a copy were three operations in series. One
// block: the flag is cleared only once every thread is past the wait.
extern "C" __global__ void pass_take_u32(uint32_t* ready, const uint32_t* __restrict__ src0, uint32_t* __restrict__ dst0,
                                         uint32_t n0, const uint32_t* __restrict__ src1, uint32_t* __restrict__ dst1,
                                         uint32_t n1) {
    if (threadIdx.x == 0) {
        uint32_t v;
        do {
            asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(ready) : "memory");
        } while (v != 1u);
    }
    __syncthreads();
    const uint32_t total = n0 + n1;
    for (uint32_t i = threadIdx.x; i < total; i += blockDim.x) {
        if (i < n0) dst0[i] = ((const volatile uint32_t*)src0)[i];
        else dst1[i - n0] = ((const volatile uint32_t*)src1)[i - n0];
    }
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(ready), "r"(0u) : "memory");
}

// A routed pass's layer on the coordinator (ops/cuda/pass.rs): copies the layer's two spans into
// the exchange, then for each node of the layer (bit i of `nodes`, its flags `stride` words
// apart) clears its done flag, still set from the step before, and sets its ready flag — one
// launch where a copy and two flag writes a node were operations in series. One block: the flags
// are written once every thread's copies are done, behind a system-scope fence, so a node that
// sees its ready flag sees the layer, and its done write comes after the clear.
extern "C" __global__ void pass_give_u32(const uint32_t* __restrict__ src0, uint32_t* __restrict__ dst0, uint32_t n0,
                                         const uint32_t* __restrict__ src1, uint32_t* __restrict__ dst1, uint32_t n1,
                                         uint32_t* ready, uint32_t* done, uint32_t stride,
                                         unsigned long long nodes) {
    const uint32_t total = n0 + n1;
    for (uint32_t i = threadIdx.x; i < total; i += blockDim.x) {
        if (i < n0) dst0[i] = src0[i];
        else dst1[i - n0] = src1[i - n0];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 0; i < 64; ++i)
            if ((nodes >> i) & 1ull)
                asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(done + (size_t)i * stride), "r"(0u) : "memory");
        __threadfence_system();
        for (int i = 0; i < 64; ++i)
            if ((nodes >> i) & 1ull)
                asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(ready + (size_t)i * stride), "r"(1u) : "memory");
    }
}

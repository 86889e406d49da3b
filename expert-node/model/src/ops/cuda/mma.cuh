// Included by kernels.cu before the kernels that use them: the tensor-core and asynchronous-copy
// primitives of the MoE tiles (moe_mma.cuh) and prefill attention (prefill_attention.cuh), as
// inline PTX (PTX ISA: `mma.sync` m16n8k16, `ldmatrix`, `cp.async`).
#pragma once

// One m16n8k16 product on the tensor cores, bf16 in, f32 accumulated in place (the operands in
// the PTX ISA's fragment layouts: a lane holds rows lane / 4 and lane / 4 + 8, columns
// 2 (lane % 4) and the next).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices from shared memory, lanes 8j..8j+7 naming matrix j's rows.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

__device__ __forceinline__ uint32_t pack_bf16(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// 16 bytes from global to shared memory, asynchronously; zeros when `valid` is false (`src` must
// still be a mapped address: nothing is read from it then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The K loop over a ring of STAGES shared-memory stages: `load(kt)` issues step kt's copies into
// stage kt % STAGES, `compute(kt)` works on that stage once it has landed; the next STAGES - 1
// steps' loads are in flight meanwhile. On return every copy has landed and every warp is done
// with the ring (its memory may be reused).
template <int STAGES, typename Load, typename Compute>
__device__ __forceinline__ void cp_async_ring(int steps, Load load, Compute compute) {
#pragma unroll
    for (int kt = 0; kt < STAGES - 1; ++kt) {
        if (kt < steps) load(kt);
        cp_async_commit();
    }
    for (int kt = 0; kt < steps; ++kt) {
        cp_async_wait<STAGES - 2>();
        // Step kt has landed for every thread, and every warp is done with step kt - 1, whose
        // stage the next load reuses.
        __syncthreads();
        if (kt + STAGES - 1 < steps) load(kt + STAGES - 1);
        cp_async_commit();
        compute(kt);
    }
    cp_async_wait<0>();
    __syncthreads();
}

// The block's dynamic shared memory as a `T`: traps when the launch gave less than sizeof(T) (a
// launch sized on the host apart from the layout it holds).
extern __shared__ __align__(128) unsigned char dynamic_shared_bytes[];
template <typename T>
__device__ __forceinline__ T& dynamic_shared_as() {
    unsigned given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < sizeof(T)) __trap();
    return *reinterpret_cast<T*>(dynamic_shared_bytes);
}

// Included by kernels.cu (after its helpers f, rn, silu_mul and the routing-table layout):
// the tensor-core forms of the MoE gate/up and down steps, for experts with many tokens.
#pragma once

// The same two steps for experts with many tokens (prefill), on the tensor cores (WMMA, bf16 in,
// f32 accumulate): a block of 8 warps computes a tile of 64 slots x 64 outputs of one expert,
// each warp 16 x 32, over K in steps of 64 through shared memory: 128 bytes of each weight row a
// step, whole cache lines (steps of 32 took half lines; 64 ran a 512-token prefill 3-4% faster on
// an H200, BENCHMARKS.md run 14). 64 slots a tile, so that an expert with 33-64 tokens (a 512-token
// prompt gives each expert 32 on average) has its weights streamed by one tile rather than two;
// warps whose 16 rows are all past the expert's tokens skip the arithmetic. `tiles` lists (group,
// first slot of the tile within the group) per blockIdx.y. Each output element depends only on
// its own slot's row and the expert's weights, so grouping never changes it; neither the K step
// nor the tile's height changes any sum's order.
#define MMA_M 64
#define MMA_THREADS (MMA_M / 16 * 2 * 32)
#define MMA_N 64
#define MMA_K 64
#define MMA_LD (MMA_K + 8)
#define OUT_LD (MMA_N + 4)

// Tiles reach shared memory through cp.async (sm_80+) in a ring of stages: the loads of the next
// stages are in flight while the tensor cores work on this one (the synchronous loads before
// left the block idle during every load: gate/up streamed its weights at 2.35 TB/s, down at
// 2.0, on an H200; 2.9 and 2.5 with the ring). The loads change nothing in the arithmetic: the
// same products in the same order. The stages live in dynamic shared memory (54 KiB a block, past
// the 48 KB of static shared memory); at 32-slot tiles three and four stages measured the same
// as these.
#define GU_STAGES 2
#define DOWN_STAGES 3

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

// The rows of a gathered A tile ([m0, m0 + MMA_M) of a group) that this thread copies: row r is
// `src_row(r)` (zeros past `rows`, with nothing read). Found once, before the K loop, so that the
// gather's index loads stay out of its steps. MMA_THREADS threads, 8 bf16 at a time.
struct ATileRows {
    static constexpr int PER = MMA_M * 8 / MMA_THREADS;
    const bf16* src[PER];
    bool valid[PER];

    template <typename RowPtr>
    __device__ __forceinline__ ATileRows(RowPtr src_row, int rows) {
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int r = (threadIdx.x >> 3) + q * (MMA_THREADS / 8);
            valid[q] = r < rows;
            src[q] = src_row(valid[q] ? r : 0);
        }
    }

    // Columns [k0, k0 + 64) of the tile into `dst`.
    __device__ __forceinline__ void load(bf16 (*dst)[MMA_LD], int k0) const {
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int r = (threadIdx.x >> 3) + q * (MMA_THREADS / 8), c = (threadIdx.x & 7) * 8;
            cp_async16(&dst[r][c], src[q] + k0 + c, valid[q]);
        }
    }
};

// Rows [n0, n0 + 64) of a weight matrix `w` [n_total, K] row-major, columns [k0, k0 + 64).
__device__ __forceinline__ void load_b_tile(bf16 (*dst)[MMA_LD], const bf16* w, int n0, int n_total,
                                            int K, int k0) {
#pragma unroll
    for (int q = 0; q < MMA_N * 8 / MMA_THREADS; ++q) {
        const int r = (threadIdx.x >> 3) + q * (MMA_THREADS / 8), c = (threadIdx.x & 7) * 8;
        const bool valid = n0 + r < n_total;
        cp_async16(&dst[r][c], w + (size_t)(valid ? n0 + r : 0) * K + k0 + c, valid);
    }
}

// The block's dynamic shared memory, of which the caller needs `need` bytes: traps when the
// launch gave less (a launch sized on the host apart from the layout it holds).
extern __shared__ __align__(128) unsigned char dynamic_shared_bytes[];
__device__ __forceinline__ unsigned char* dynamic_shared(size_t need) {
    unsigned given;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(given));
    if (given < need) __trap();
    return dynamic_shared_bytes;
}

// The dynamic shared memory of a tile kernel as `T` (moe.rs sizes it: `mma_shared_bytes`).
template <typename T>
__device__ __forceinline__ T& mma_shared_as() {
    return *reinterpret_cast<T*>(dynamic_shared(sizeof(T)));
}

// Where a warp's 16 x 32 part of the tile lies: warps along M first.
__device__ __forceinline__ int warp_m() { return ((threadIdx.x >> 5) % (MMA_M / 16)) * 16; }
__device__ __forceinline__ int warp_n() { return ((threadIdx.x >> 5) / (MMA_M / 16)) * 32; }

// Shared memory of the gate/up kernel: the ring of stages, then (reusing it once the K loop is
// done) the f32 accumulators on their way to the SiLU.
struct GateUpStage {
    bf16 xs[MMA_M][MMA_LD];
    bf16 wg[MMA_N][MMA_LD];
    bf16 wu[MMA_N][MMA_LD];
};
union GateUpShared {
    GateUpStage stage[GU_STAGES];
    struct {
        float g[MMA_M][OUT_LD];
        float u[MMA_M][OUT_LD];
    } out;
};

struct DownStage {
    bf16 a[MMA_M][MMA_LD];
    bf16 w[MMA_N][MMA_LD];
};
union DownShared {
    DownStage stage[DOWN_STAGES];
    float out[MMA_M][OUT_LD];
};

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4) moe_gate_up_mma_bf16(const bf16* __restrict__ xs, const bf16* __restrict__ w13,
                                                const uint32_t* __restrict__ tab, int G, int S, int H,
                                                int I, const uint32_t* __restrict__ tiles,
                                                const uint32_t* __restrict__ live,
                                                bf16* __restrict__ act) {
    using namespace nvcuda;
    if (blockIdx.y >= live[1]) return;
    GateUpShared& sh = mma_shared_as<GateUpShared>();
    const uint32_t g = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* token = tab + 3 * G;
    const int rows = min((int)(count - m0), MMA_M);
    const int n0 = blockIdx.x * MMA_N;
    const bf16* wg = w13 + (size_t)e * 2 * I * H;
    const bf16* wu = wg + (size_t)I * H;
    const int wm = warp_m(), wn = warp_n();
    // Warp-uniform: a warp whose rows are all padding has nothing to compute.
    const bool busy = wm < rows;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[2], acc_u[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        wmma::fill_fragment(acc_g[i], 0.f);
        wmma::fill_fragment(acc_u[i], 0.f);
    }
    const ATileRows a_rows([&](int r) { return xs + (size_t)token[start + m0 + r] * H; }, rows);
    auto load = [&](int kt) {
        GateUpStage& st = sh.stage[kt % GU_STAGES];
        a_rows.load(st.xs, kt * MMA_K);
        load_b_tile(st.wg, wg, n0, I, H, kt * MMA_K);
        load_b_tile(st.wu, wu, n0, I, H, kt * MMA_K);
    };
    cp_async_ring<GU_STAGES>(H / MMA_K, load, [&](int kt) {
        const GateUpStage& st = sh.stage[kt % GU_STAGES];
        if (!busy) return;
#pragma unroll
        for (int kk = 0; kk < MMA_K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
            wmma::load_matrix_sync(a, &st.xs[wm][kk], MMA_LD);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                wmma::load_matrix_sync(b, &st.wg[wn + i * 16][kk], MMA_LD);
                wmma::mma_sync(acc_g[i], a, b, acc_g[i]);
                wmma::load_matrix_sync(b, &st.wu[wn + i * 16][kk], MMA_LD);
                wmma::mma_sync(acc_u[i], a, b, acc_u[i]);
            }
        }
    });
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        wmma::store_matrix_sync(&sh.out.g[wm][wn + i * 16], acc_g[i], OUT_LD, wmma::mem_row_major);
        wmma::store_matrix_sync(&sh.out.u[wm][wn + i * 16], acc_u[i], OUT_LD, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < MMA_M * MMA_N; idx += blockDim.x) {
        const int r = idx / MMA_N, c = idx % MMA_N;
        if (r < rows && n0 + c < I)
            act[(size_t)(start + m0 + r) * I + n0 + c] = rn(silu_mul(sh.out.g[r][c], sh.out.u[r][c]));
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4) moe_down_mma_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                             const uint32_t* __restrict__ tab, int G, int S, int H,
                                             int I, const uint32_t* __restrict__ tiles,
                                             const uint32_t* __restrict__ live,
                                             bf16* __restrict__ out) {
    using namespace nvcuda;
    if (blockIdx.y >= live[1]) return;
    DownShared& sh = mma_shared_as<DownShared>();
    const uint32_t g = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* row = tab + 3 * G + S;
    const uint32_t* weight = tab + 3 * G + 2 * S;
    const int rows = min((int)(count - m0), MMA_M);
    const int n0 = blockIdx.x * MMA_N;
    const bf16* wd = w2 + (size_t)e * H * I;
    const int wm = warp_m(), wn = warp_n();
    // Warp-uniform: a warp whose rows are all padding has nothing to compute.
    const bool busy = wm < rows;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    const ATileRows a_rows([&](int r) { return act + (size_t)(start + m0 + r) * I; }, rows);
    auto load = [&](int kt) {
        DownStage& st = sh.stage[kt % DOWN_STAGES];
        a_rows.load(st.a, kt * MMA_K);
        load_b_tile(st.w, wd, n0, H, I, kt * MMA_K);
    };
    cp_async_ring<DOWN_STAGES>(I / MMA_K, load, [&](int kt) {
        const DownStage& st = sh.stage[kt % DOWN_STAGES];
        if (!busy) return;
#pragma unroll
        for (int kk = 0; kk < MMA_K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
            wmma::load_matrix_sync(a, &st.a[wm][kk], MMA_LD);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                wmma::load_matrix_sync(b, &st.w[wn + i * 16][kk], MMA_LD);
                wmma::mma_sync(acc[i], a, b, acc[i]);
            }
        }
    });
#pragma unroll
    for (int i = 0; i < 2; ++i)
        wmma::store_matrix_sync(&sh.out[wm][wn + i * 16], acc[i], OUT_LD, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < MMA_M * MMA_N; idx += blockDim.x) {
        const int r = idx / MMA_N, c = idx % MMA_N;
        if (r < rows && n0 + c < H) {
            const uint32_t s = start + m0 + r;
            const float w = f(rn(__uint_as_float(weight[s])));
            out[(size_t)row[s] * H + n0 + c] = rn(f(rn(sh.out[r][c])) * w);
        }
    }
}

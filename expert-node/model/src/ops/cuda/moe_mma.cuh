// Included by kernels.cu (after mma.cuh's primitives and its helpers f, rn, silu_mul and the
// routing-table layout): the tensor-core forms of the MoE gate/up and down steps, for experts with
// many tokens.
#pragma once

// A block computes a tile of 64 slots x N outputs of one expert (of both gate and up for the
// first step), over K in steps of 64 (128 bytes of each row a step: whole cache lines) through a
// ring of shared-memory stages filled by cp.async, each warp 32 x 32 of every matrix as
// `mma.sync` m16n8k16 tiles with operands from `ldmatrix` (mma.cuh): 8 products a matrix for
// every 2 + 2 a matrix shared-memory loads. The WMMA kernels before these had 8 warps of 16 x 32
// (8 products for 5 loads) and took 25-36% longer (BENCHMARKS.md run 16). A producer warp
// filling the stages through mbarriers while the others computed was slower still: with bulk
// copies (TMA, one a 128-byte row) 3.6x, with 16-byte cp.async from the one warp 1.1x.
//
// 64 slots a tile, so that an expert with 33-64 tokens (a 512-token prompt gives each expert 32
// on average) has its weights streamed by one tile rather than two; warps whose 32 rows are all
// past the expert's tokens skip the arithmetic. `tiles` lists (group, first slot of the tile
// within the group) per blockIdx.y. Each output element is its slot's row times the expert's
// weights summed in 16-wide K pieces in ascending order, one `mma` a piece (as the WMMA kernels
// summed), so neither the grouping, the tile's shape nor the warps' shapes change any sum.
#define MMA_M 64
#define MMA_K 64
#define MMA_LD (MMA_K + 8)
// A block of N outputs has a warp per 32 x 32: MMA_M / 32 along M, N / 32 along N.
#define MMA_THREADS(N) (MMA_M / 32 * ((N) / 32) * 32)

// Tile widths, stages and blocks an SM (measured on an H200, BENCHMARKS.md run 16), each ring
// within the 99 KiB of shared memory a block may have on sm_86/sm_89. Gate/up: 64 outputs of
// both matrices, 4 warps, 3 stages (81 KiB, two blocks an SM on Hopper; a fourth stage gained
// nothing); 128 wide it was 8% slower. Down: 128 outputs, 8 warps, 3 stages (81 KiB, two blocks
// an SM): each input row serves twice the outputs of a 64-wide tile, 7-12% faster than 64 wide.
#define GU_N 64
#define GU_STAGES 3
#define GU_BLOCKS 2
#define DOWN_N 128
#define DOWN_STAGES 3
#define DOWN_BLOCKS 2

// The ring of a tile kernel over `MATS` weight matrices (gate/up 2, down 1), in dynamic shared
// memory (moe.rs sizes it: `mma_shared_bytes`). Rows are padded to 144 bytes, so the 8 rows an
// `ldmatrix` reads fall in distinct banks.
template <int MATS, int N, int STAGES>
struct TileShared {
    struct {
        bf16 a[MMA_M][MMA_LD];
        bf16 w[MATS * N][MMA_LD];
    } stage[STAGES];
};

// One K step of a warp's 32 x 32 of every matrix at rows `wm`, columns `wn` of the tile:
// acc[m][i][j] is the m16n8 accumulator of rows wm + 16 i, columns wn + 8 j of matrix m.
template <int N, typename Stage, int MATS>
__device__ __forceinline__ void tile_step(const Stage& st, int wm, int wn, float (&acc)[MATS][2][4][4]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < MMA_K; kk += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) ldmatrix_x4(a[i], &st.a[wm + 16 * i + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
        for (int m = 0; m < MATS; ++m)
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, &st.w[m * N + wn + j * 8 + (lane & 7) + (lane >> 4) * 8]
                                    [kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    mma_16816(acc[m][i][j], a[i], b[0], b[1]);
                    mma_16816(acc[m][i][j + 1], a[i], b[2], b[3]);
                }
            }
    }
}

// A tile of MMA_M x N over a cp.async ring (mma.cuh), every thread loading: the A tile's `rows`
// rows (row r at `a_row_of(r)`) and rows [n0, n0 + N) of each of the `MATS` matrices `w[m]`
// ([n_total, K] row-major), 64 columns a step. A rows past `rows` and weight rows past `n_total`
// are not copied: they feed only outputs that are never stored. Each warp computes 32 x 32 (rows
// `wm`, columns `wn`), and skips the arithmetic when all its rows are padding or all its columns
// past `n_total`. Returns whether this thread holds accumulators in `acc`.
template <int MATS, int N, int STAGES, typename ARow>
__device__ __forceinline__ bool tile_run(ARow a_row_of, int rows, const bf16* const (&w)[MATS],
                                         int n0, int n_total, int K, int& wm, int& wn,
                                         float (&acc)[MATS][2][4][4]) {
    using Shared = TileShared<MATS, N, STAGES>;
    constexpr int THREADS = MMA_THREADS(N);
    Shared& sh = dynamic_shared_as<Shared>();
    const int warp = threadIdx.x >> 5;
    wm = (warp % (MMA_M / 32)) * 32;
    wn = (warp / (MMA_M / 32)) * 32;
    const int w_rows = min(N, n_total - n0);
    const bool busy = wm < rows && wn < w_rows;
#pragma unroll
    for (int m = 0; m < MATS; ++m)
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[m][i][j][0] = acc[m][i][j][1] = acc[m][i][j][2] = acc[m][i][j][3] = 0.f;
    // 16-byte copies, eight threads to a row: each copy instruction reads four whole cache lines.
    constexpr int A_PER = MMA_M * 8 / THREADS, W_PER = N * 8 / THREADS;
    const int c = (threadIdx.x & 7) * 8, r0 = threadIdx.x >> 3;
    const bf16* a_row[A_PER];
#pragma unroll
    for (int q = 0; q < A_PER; ++q) a_row[q] = a_row_of(min(r0 + q * (THREADS / 8), rows - 1));
    cp_async_ring<STAGES>(K / MMA_K, [&](int kt) {
        auto& st = sh.stage[kt % STAGES];
        const int k0 = kt * MMA_K + c;
#pragma unroll
        for (int q = 0; q < A_PER; ++q) {
            const int r = r0 + q * (THREADS / 8);
            if (r < rows) cp_async16(&st.a[r][c], a_row[q] + k0, true);
        }
#pragma unroll
        for (int m = 0; m < MATS; ++m)
#pragma unroll
            for (int q = 0; q < W_PER; ++q) {
                const int r = r0 + q * (THREADS / 8);
                if (r < w_rows) cp_async16(&st.w[m * N + r][c], w[m] + (size_t)(n0 + r) * K + k0, true);
            }
    }, [&](int kt) {
        if (busy) tile_step<N>(sh.stage[kt % STAGES], wm, wn, acc);
    });
    return busy;
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS(GU_N), GU_BLOCKS) moe_gate_up_mma_bf16(const bf16* __restrict__ xs, const bf16* __restrict__ w13,
                                                const uint32_t* __restrict__ tab, int G, int S, int H,
                                                int I, const uint32_t* __restrict__ tiles,
                                                const uint32_t* __restrict__ live,
                                                bf16* __restrict__ act) {
    if (blockIdx.y >= live[1]) return;
    const uint32_t g = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* token = tab + 3 * G;
    const int rows = min((int)(count - m0), MMA_M);
    const int n0 = blockIdx.x * GU_N;
    const bf16* wg = w13 + (size_t)e * 2 * I * H;
    const bf16* const w[2] = {wg, wg + (size_t)I * H};
    auto a_row_of = [&](int r) { return xs + (size_t)token[start + m0 + r] * H; };
    int wm, wn;
    float acc[2][2][4][4];
    if (!tile_run<2, GU_N, GU_STAGES>(a_row_of, rows, w, n0, I, H, wm, wn, acc)) return;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = wm + 16 * i + (lane >> 2) + 8 * h;
            if (r >= rows) continue;
            bf16* dst = act + (size_t)(start + m0 + r) * I + n0 + wn + 2 * (lane & 3);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (n0 + wn + 8 * j >= I) continue;
                const float* gv = &acc[0][i][j][2 * h];
                const float* uv = &acc[1][i][j][2 * h];
                *reinterpret_cast<uint32_t*>(dst + 8 * j) =
                    pack_bf16(rn(silu_mul(gv[0], uv[0])), rn(silu_mul(gv[1], uv[1])));
            }
        }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS(DOWN_N), DOWN_BLOCKS) moe_down_mma_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                             const uint32_t* __restrict__ tab, int G, int S, int H,
                                             int I, const uint32_t* __restrict__ tiles,
                                             const uint32_t* __restrict__ live,
                                             bf16* __restrict__ out) {
    if (blockIdx.y >= live[1]) return;
    const uint32_t g = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* row = tab + 3 * G + S;
    const uint32_t* weight = tab + 3 * G + 2 * S;
    const int rows = min((int)(count - m0), MMA_M);
    const int n0 = blockIdx.x * DOWN_N;
    const bf16* const w[1] = {w2 + (size_t)e * H * I};
    auto a_row_of = [&](int r) { return act + (size_t)(start + m0 + r) * I; };
    int wm, wn;
    float acc[1][2][4][4];
    if (!tile_run<1, DOWN_N, DOWN_STAGES>(a_row_of, rows, w, n0, H, I, wm, wn, acc)) return;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = wm + 16 * i + (lane >> 2) + 8 * h;
            if (r >= rows) continue;
            const uint32_t s = start + m0 + r;
            const float wt = f(rn(__uint_as_float(weight[s])));
            bf16* dst = out + (size_t)row[s] * H + n0 + wn + 2 * (lane & 3);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (n0 + wn + 8 * j >= H) continue;
                const float* v = &acc[0][i][j][2 * h];
                *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack_bf16(rn(f(rn(v[0])) * wt), rn(f(rn(v[1])) * wt));
            }
        }
}

// Included by kernels.cu (after its helpers f, rn, silu_mul and the routing-table layout):
// the tensor-core forms of the MoE gate/up and down steps, for experts with many tokens.
#pragma once

// The same two steps for experts with many tokens (prefill), on the tensor cores (WMMA, bf16 in,
// f32 accumulate): a block computes a tile of 32 slots x 64 outputs of one expert, 4 warps of
// 16 x 32, over K in steps of 32 through shared memory. `tiles` lists (group, first slot of the
// tile within the group) per blockIdx.y. Each output element depends only on its own slot's row
// and the expert's weights, so grouping never changes it.
#define MMA_M 32
#define MMA_N 64
#define MMA_K 32
#define MMA_LD (MMA_K + 8)
#define OUT_LD (MMA_N + 4)

// Rows [m0, m0 + 32) of a gathered A tile: row r is `src_row(r)` (or zeros past `rows`), columns
// [k0, k0 + 32). 128 threads, 8 bf16 each.
template <typename RowPtr>
__device__ __forceinline__ void load_a_tile(bf16 (*dst)[MMA_LD], RowPtr src_row, int rows, int k0) {
    const int r = threadIdx.x >> 2, c = (threadIdx.x & 3) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows) v = *reinterpret_cast<const uint4*>(src_row(r) + k0 + c);
    *reinterpret_cast<uint4*>(&dst[r][c]) = v;
}

// Rows [n0, n0 + 64) of a weight matrix `w` [n_total, K] row-major, columns [k0, k0 + 32).
__device__ __forceinline__ void load_b_tile(bf16 (*dst)[MMA_LD], const bf16* w, int n0, int n_total,
                                            int K, int k0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = (threadIdx.x >> 2) + half * 32, c = (threadIdx.x & 3) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (n0 + r < n_total) v = *reinterpret_cast<const uint4*>(w + (size_t)(n0 + r) * K + k0 + c);
        *reinterpret_cast<uint4*>(&dst[r][c]) = v;
    }
}

extern "C" __global__ void moe_gate_up_mma_bf16(const bf16* __restrict__ xs, const bf16* __restrict__ w13,
                                                const uint32_t* __restrict__ tab, int G, int S, int H,
                                                int I, const uint32_t* __restrict__ tiles,
                                                bf16* __restrict__ act) {
    using namespace nvcuda;
    __shared__ __align__(32) bf16 xs_s[MMA_M][MMA_LD];
    __shared__ __align__(32) bf16 wg_s[MMA_N][MMA_LD];
    __shared__ __align__(32) bf16 wu_s[MMA_N][MMA_LD];
    __shared__ __align__(32) float out_g[MMA_M][OUT_LD];
    __shared__ __align__(32) float out_u[MMA_M][OUT_LD];
    const uint32_t g = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* token = tab + 3 * G;
    const int rows = min((int)(count - m0), MMA_M);
    const int n0 = blockIdx.x * MMA_N;
    const bf16* wg = w13 + (size_t)e * 2 * I * H;
    const bf16* wu = wg + (size_t)I * H;
    const int warp = threadIdx.x >> 5, wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_g[2], acc_u[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        wmma::fill_fragment(acc_g[i], 0.f);
        wmma::fill_fragment(acc_u[i], 0.f);
    }
    auto x_row = [&](int r) { return xs + (size_t)token[start + m0 + r] * H; };
    for (int k0 = 0; k0 < H; k0 += MMA_K) {
        load_a_tile(xs_s, x_row, rows, k0);
        load_b_tile(wg_s, wg, n0, I, H, k0);
        load_b_tile(wu_s, wu, n0, I, H, k0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMA_K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
            wmma::load_matrix_sync(a, &xs_s[wm][kk], MMA_LD);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                wmma::load_matrix_sync(b, &wg_s[wn + i * 16][kk], MMA_LD);
                wmma::mma_sync(acc_g[i], a, b, acc_g[i]);
                wmma::load_matrix_sync(b, &wu_s[wn + i * 16][kk], MMA_LD);
                wmma::mma_sync(acc_u[i], a, b, acc_u[i]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        wmma::store_matrix_sync(&out_g[wm][wn + i * 16], acc_g[i], OUT_LD, wmma::mem_row_major);
        wmma::store_matrix_sync(&out_u[wm][wn + i * 16], acc_u[i], OUT_LD, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < MMA_M * MMA_N; idx += blockDim.x) {
        const int r = idx / MMA_N, c = idx % MMA_N;
        if (r < rows && n0 + c < I)
            act[(size_t)(start + m0 + r) * I + n0 + c] = rn(silu_mul(out_g[r][c], out_u[r][c]));
    }
}

extern "C" __global__ void moe_down_mma_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                             const uint32_t* __restrict__ tab, int G, int S, int H,
                                             int I, const uint32_t* __restrict__ tiles,
                                             bf16* __restrict__ out) {
    using namespace nvcuda;
    __shared__ __align__(32) bf16 a_s[MMA_M][MMA_LD];
    __shared__ __align__(32) bf16 w_s[MMA_N][MMA_LD];
    __shared__ __align__(32) float out_s[MMA_M][OUT_LD];
    const uint32_t g = tiles[2 * blockIdx.y], m0 = tiles[2 * blockIdx.y + 1];
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* row = tab + 3 * G + S;
    const uint32_t* weight = tab + 3 * G + 2 * S;
    const int rows = min((int)(count - m0), MMA_M);
    const int n0 = blockIdx.x * MMA_N;
    const bf16* wd = w2 + (size_t)e * H * I;
    const int warp = threadIdx.x >> 5, wm = (warp & 1) * 16, wn = (warp >> 1) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    auto a_row = [&](int r) { return act + (size_t)(start + m0 + r) * I; };
    for (int k0 = 0; k0 < I; k0 += MMA_K) {
        load_a_tile(a_s, a_row, rows, k0);
        load_b_tile(w_s, wd, n0, H, I, k0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MMA_K; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
            wmma::load_matrix_sync(a, &a_s[wm][kk], MMA_LD);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                wmma::load_matrix_sync(b, &w_s[wn + i * 16][kk], MMA_LD);
                wmma::mma_sync(acc[i], a, b, acc[i]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
        wmma::store_matrix_sync(&out_s[wm][wn + i * 16], acc[i], OUT_LD, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < MMA_M * MMA_N; idx += blockDim.x) {
        const int r = idx / MMA_N, c = idx % MMA_N;
        if (r < rows && n0 + c < H) {
            const uint32_t s = start + m0 + r;
            const float w = f(rn(__uint_as_float(weight[s])));
            out[(size_t)row[s] * H + n0 + c] = rn(f(rn(out_s[r][c])) * w);
        }
    }
}

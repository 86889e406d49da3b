// omnishard's CUDA kernels, bf16 in and out, f32 inside. Each rounds where the reference
// (transformers 4.57.3 in bf16, see the Rust callers in ops/cuda/mod.rs) rounds, so the GPU path
// stays within bf16 tolerance of the CPU f32 path; each output element is computed by one thread
// or one warp in a fixed order, so results do not depend on how work is grouped into launches
// (the cluster and the single process get the same bits).
//
// The fused MoE step follows the shape of vLLM's fused_moe (Kwon et al., SOSP'23; vLLM
// fused_moe.py): (token, expert) slots sorted by expert on the host, one launch for gate+up+SiLU
// over every selected expert of the layer, one for down with the router weight applied. For decode
// and small batches it is a grouped GEMV: one warp streams one weight row with 16-byte loads and
// applies it to every token of its expert, so each expert row is read from memory once.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 rn(float x) { return __float2bfloat16_rn(x); }

// Butterfly sum: every lane ends with the same value, added in the same order on every run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Warp argmax of (v, i): the larger value, ties to the lower index; every lane ends with it.
__device__ __forceinline__ void warp_argmax(float& v, uint32_t& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float p = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
        p = warp_sum(p);
        if (lane == 0) total = p;
    }
    __syncthreads();
    const float r = total;
    __syncthreads();
    return r;
}

// 8 bf16 products of a 16-byte chunk, added in order into acc.
__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
    const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* pb = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 x = __bfloat1622float2(pa[i]);
        const float2 y = __bfloat1622float2(pb[i]);
        acc = fmaf(x.x, y.x, acc);
        acc = fmaf(x.y, y.y, acc);
    }
    return acc;
}

#include "norm.cuh"

// The routing tables of one MoE launch, one u32 buffer:
//   [0, G)        local expert index of group g (row of the stacked weights)
//   [G, 2G)       first sorted slot of group g
//   [2G, 3G)      number of slots (tokens) of group g
//   [3G, 3G+S)    token (row of xs) of each sorted slot
//   [3G+S, 3G+2S) output row of each sorted slot (its assignment index)
//   [3G+2S, 3G+3S) router weight of each sorted slot, f32 bits
// G may exceed the groups in use: the kernels take the groups and tiles that `live` = {GEMV
// groups, tiles} names (a table built on the GPU is sized for the most there can be).
#define MOE_TOKENS 4

__device__ __forceinline__ float silu_mul(float gate, float up) {
    const float g = f(rn(gate)), u = f(rn(up));
    return f(rn(g / (1.0f + expf(-g)))) * u;
}

// 16-byte chunks of a gate and an up row a lane holds at once in moe_gate_up_bf16 (rows of
// 2,048 in two passes). The tokens' rows, shared by every row pair of the block, come from
// shared memory: held in registers (four tokens' worth, loads unrolled four deep) they took the
// kernel to 96 registers and 16 warps an SM. Staged, and bounded to 64 registers (4 blocks of 8
// warps an SM; ptxas spills 4 bytes), it keeps twice the warps' weight loads in flight.
#define GATE_UP_CHUNKS 4

// One chunk of T tokens (T <= MOE_TOKENS, staged in `xs`, chunk c of the pass at xs[m][c]) of a
// gate+up row pair's pass. A template so that a chunk of one token (every expert at batch 1,
// most at batch 32) does one token's work. Each token's per-lane sums run over the lane's chunks
// in ascending order whatever T and the pass split are (the same bits as moe_gate_up1_bf16).
template <int T>
__device__ __forceinline__ void gate_up_pass(const uint4 (&gv)[GATE_UP_CHUNKS], const uint4 (&uv)[GATE_UP_CHUNKS],
                                             const uint4* __restrict__ xs, int stride, int chunks, int lane,
                                             float (&ag)[MOE_TOKENS], float (&au)[MOE_TOKENS]) {
#pragma unroll
    for (int c = 0; c < GATE_UP_CHUNKS; ++c) {
        if (lane + 32 * c >= chunks) break;
#pragma unroll
        for (int m = 0; m < T; ++m) {
            const uint4 xv = xs[m * stride + lane + 32 * c];
            ag[m] = dot8(gv[c], xv, ag[m]);
            au[m] = dot8(uv[c], xv, au[m]);
        }
    }
}

// Stages rows `first`.. of `rows` (T of them, `row_of` mapping a slot to its row when given),
// chunks [p0, p0 + chunks) of each, into `staged` (row m at m * stride); the whole block takes
// part.
__device__ __forceinline__ void stage_rows(const bf16* __restrict__ rows, const uint32_t* __restrict__ row_of,
                                           uint32_t first, int T, int width, int p0, int chunks, int stride,
                                           uint4* __restrict__ staged) {
    for (int q = threadIdx.x; q < T * chunks; q += blockDim.x) {
        const int m = q / chunks, c = q - m * chunks;
        const uint32_t r = row_of ? row_of[first + m] : first + m;
        staged[m * stride + c] = reinterpret_cast<const uint4*>(rows + (size_t)r * width)[p0 + c];
    }
}

// act[slot, j] = silu(gate_j . x) * (up_j . x) for every slot of group blockIdx.y, one warp per j.
// w13: [experts, 2I, H], gate rows then up rows; act: [S, I] in sorted-slot order.
// Dynamic shared memory: MOE_TOKENS * min(H, 32 * 8 * GATE_UP_CHUNKS) bf16.
extern "C" __global__ void __launch_bounds__(256, 4) moe_gate_up_bf16(const bf16* __restrict__ xs, const bf16* __restrict__ w13,
                                            const uint32_t* __restrict__ tab, int G, int S, int H,
                                            int I, const uint32_t* __restrict__ live,
                                            bf16* __restrict__ act) {
    extern __shared__ uint4 staged[];
    const int g = blockIdx.y, lane = threadIdx.x & 31;
    // Uniform over the block, which synchronizes below.
    if (g >= (int)live[0]) return;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* token = tab + 3 * G;
    // Warps past the last row load row I - 1 and write nothing.
    const uint4* wg = reinterpret_cast<const uint4*>(w13 + ((size_t)e * 2 * I + min(j, I - 1)) * H);
    const uint4* wu = wg + (size_t)I * H / 8;
    const int row_chunks = H / 8, per_pass = 32 * GATE_UP_CHUNKS;
    const int stride = min(row_chunks, per_pass);
    for (uint32_t t0 = 0; t0 < count; t0 += MOE_TOKENS) {
        const int T = (int)min(count - t0, (uint32_t)MOE_TOKENS);
        float ag[MOE_TOKENS], au[MOE_TOKENS];
#pragma unroll
        for (int m = 0; m < MOE_TOKENS; ++m) ag[m] = au[m] = 0.f;
        for (int p0 = 0; p0 < row_chunks; p0 += per_pass) {
            const int chunks = min(per_pass, row_chunks - p0);
            // The weights first, so that their loads are in flight while the block stages.
            uint4 gv[GATE_UP_CHUNKS], uv[GATE_UP_CHUNKS];
#pragma unroll
            for (int c = 0; c < GATE_UP_CHUNKS; ++c) {
                const bool in = lane + 32 * c < chunks;
                gv[c] = in ? wg[p0 + lane + 32 * c] : make_uint4(0, 0, 0, 0);
                uv[c] = in ? wu[p0 + lane + 32 * c] : make_uint4(0, 0, 0, 0);
            }
            __syncthreads();
            stage_rows(xs, token, start + t0, T, H, p0, chunks, stride, staged);
            __syncthreads();
            switch (T) {
                case 1: gate_up_pass<1>(gv, uv, staged, stride, chunks, lane, ag, au); break;
                case 2: gate_up_pass<2>(gv, uv, staged, stride, chunks, lane, ag, au); break;
                case 3: gate_up_pass<3>(gv, uv, staged, stride, chunks, lane, ag, au); break;
                default: gate_up_pass<MOE_TOKENS>(gv, uv, staged, stride, chunks, lane, ag, au); break;
            }
        }
#pragma unroll
        for (int m = 0; m < MOE_TOKENS; ++m) {
            if (m >= T) break;
            const float gs = warp_sum(ag[m]), us = warp_sum(au[m]);
            if (lane == 0 && j < I) act[(size_t)(start + t0 + m) * I + j] = rn(silu_mul(gs, us));
        }
    }
}

// Rows of `w2` one warp of moe_down_bf16 takes, their loads in flight together, and the 16-byte
// chunks of each that a lane holds at once (one pass over rows up to 32 * 8 * DOWN_CHUNKS = 768
// wide, Qwen3-30B-A3B's). Down rows are short (three 16-byte loads a lane), so a warp with one
// row had too little in flight to stream the weights; the activations, shared by every row of
// the block, come from shared memory so that a second row costs registers for its weights only.
#define DOWN_ROWS 2
#define DOWN_CHUNKS 3

// One chunk of T slots (T <= MOE_TOKENS, staged in `xs`, chunk c of the pass at xs[m][c]) against
// the DOWN_ROWS rows' chunks `wv` of this pass: each row's per-lane sum runs over the lane's
// chunks in ascending order whatever the pass split, as the batch-1 kernel (down_rows1) does.
template <int T>
__device__ __forceinline__ void down_pass(const uint4 (&wv)[DOWN_ROWS][DOWN_CHUNKS], const uint4* __restrict__ xs,
                                          int stride, int chunks, int lane,
                                          float (&acc)[DOWN_ROWS][MOE_TOKENS]) {
#pragma unroll
    for (int c = 0; c < DOWN_CHUNKS; ++c) {
        if (lane + 32 * c >= chunks) break;
#pragma unroll
        for (int m = 0; m < T; ++m) {
            const uint4 xv = xs[m * stride + lane + 32 * c];
#pragma unroll
            for (int r = 0; r < DOWN_ROWS; ++r) acc[r][m] = dot8(wv[r][c], xv, acc[r][m]);
        }
    }
}

// out[row(slot), h] = weight(slot) * (down_h . act[slot]) for every slot of group blockIdx.y,
// DOWN_ROWS rows h per warp; the expert output is rounded to bf16, then scaled by the bf16
// router weight, as the reference's `expert_layer(x) * routing_weights` in bf16.
// w2: [experts, H, I]; dynamic shared memory: MOE_TOKENS * min(I, 32 * 8 * DOWN_CHUNKS) bf16.
extern "C" __global__ void moe_down_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                         const uint32_t* __restrict__ tab, int G, int S, int H,
                                         int I, const uint32_t* __restrict__ live,
                                         bf16* __restrict__ out) {
    extern __shared__ uint4 staged[];
    const int g = blockIdx.y, lane = threadIdx.x & 31;
    // Uniform over the block, which synchronizes below.
    if (g >= (int)live[0]) return;
    const int h0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * DOWN_ROWS;
    const uint32_t e = tab[g], start = tab[G + g], count = tab[2 * G + g];
    const uint32_t* row = tab + 3 * G + S;
    const uint32_t* weight = tab + 3 * G + 2 * S;
    const int row_chunks = I / 8, per_pass = 32 * DOWN_CHUNKS;
    const int stride = min(row_chunks, per_pass);
    for (uint32_t t0 = 0; t0 < count; t0 += MOE_TOKENS) {
        const int T = (int)min(count - t0, (uint32_t)MOE_TOKENS);
        float acc[DOWN_ROWS][MOE_TOKENS];
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; ++r)
#pragma unroll
            for (int m = 0; m < MOE_TOKENS; ++m) acc[r][m] = 0.f;
        for (int p0 = 0; p0 < row_chunks; p0 += per_pass) {
            const int chunks = min(per_pass, row_chunks - p0);
            // The weights first, so that their loads are in flight while the block stages.
            uint4 wv[DOWN_ROWS][DOWN_CHUNKS];
#pragma unroll
            for (int r = 0; r < DOWN_ROWS; ++r) {
                const int h = min(h0 + r, H - 1);
                const uint4* wr = reinterpret_cast<const uint4*>(w2 + ((size_t)e * H + h) * I) + p0;
#pragma unroll
                for (int c = 0; c < DOWN_CHUNKS; ++c)
                    wv[r][c] = lane + 32 * c < chunks ? wr[lane + 32 * c] : make_uint4(0, 0, 0, 0);
            }
            __syncthreads();
            stage_rows(act, nullptr, start + t0, T, I, p0, chunks, stride, staged);
            __syncthreads();
            switch (T) {
                case 1: down_pass<1>(wv, staged, stride, chunks, lane, acc); break;
                case 2: down_pass<2>(wv, staged, stride, chunks, lane, acc); break;
                case 3: down_pass<3>(wv, staged, stride, chunks, lane, acc); break;
                default: down_pass<MOE_TOKENS>(wv, staged, stride, chunks, lane, acc); break;
            }
        }
#pragma unroll
        for (int r = 0; r < DOWN_ROWS; ++r) {
            const int h = h0 + r;
#pragma unroll
            for (int m = 0; m < MOE_TOKENS; ++m) {
                if (m >= T) break;
                const float sum = warp_sum(acc[r][m]);
                if (lane == 0 && h < H) {
                    const uint32_t s = start + t0 + m;
                    const float w = f(rn(__uint_as_float(weight[s])));
                    out[(size_t)row[s] * H + h] = rn(f(rn(sum)) * w);
                }
            }
        }
    }
}

#include "mma.cuh"
#include "moe_mma.cuh"
#include "moe_plan.cuh"

// Batch-1 decode with the router's top-k left on the GPU (one token, k <= 32 distinct experts:
// ids at routed[0, k), weights' f32 bits at routed[k, 2k), in the router's order), so the step
// needs no host round trip. Expert i of that order takes block row blockIdx.y = i and act row i;
// the fused down below adds the experts in ascending id, the order of the host's table, so both
// give the bits of the table path. The first block of each expert adds it to the layer's usage.
#define ROUTED1_MAX_K 32
// Row j of the activation of stacked expert row `r` for the one token `xs`, into act[i, j]: the
// per-lane order and butterfly of moe_gate_up_bf16, one token, so the same bits.
__device__ __forceinline__ void gate_up1_row(const bf16* __restrict__ xs, const bf16* __restrict__ w13, uint32_t r,
                                             int H, int I, int i, int j, int lane, bf16* __restrict__ act) {
    const bf16* wg = w13 + ((size_t)r * 2 * I + j) * H;
    const bf16* wu = wg + (size_t)I * H;
    float ag = 0.f, au = 0.f;
#pragma unroll 4
    for (int k = lane * 8; k < H; k += 256) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xs + k);
        ag = dot8(*reinterpret_cast<const uint4*>(wg + k), xv, ag);
        au = dot8(*reinterpret_cast<const uint4*>(wu + k), xv, au);
    }
    ag = warp_sum(ag);
    au = warp_sum(au);
    if (lane == 0) act[(size_t)i * I + j] = rn(silu_mul(ag, au));
}

extern "C" __global__ void moe_gate_up1_bf16(const bf16* __restrict__ xs, const bf16* __restrict__ w13,
                                             const uint32_t* __restrict__ routed,
                                             const uint32_t* __restrict__ row_of, uint32_t* __restrict__ usage,
                                             int H, int I, bf16* __restrict__ act) {
    const int i = blockIdx.y, lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const uint32_t e = routed[i];
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd(&usage[e], 1u);
    if (j >= I) return;
    gate_up1_row(xs, w13, row_of[e], H, I, i, j, lane, act);
}

// Batch-1 decode: down with the router weight and the per-token sum in one launch. One warp per
// output h streams the down row of every selected expert (the groups, in ascending expert id, one
// slot each) with the same per-lane order and butterfly as moe_down_bf16, rounds each expert's
// output and its weighted value as that kernel does, and adds them in ascending expert id with a
// bf16 rounding after every add, as moe_combine_bf16: the same bits as the two-kernel path, one
// launch and one write fewer, and eight rows' loads in flight per lane instead of one.
#define DOWN1_EXPERTS 8
// The down rows `h` of DOWN1_EXPERTS experts (stacked rows wrow[m], activations arow[m]) against
// their activation rows, one warp: acc[m] on every lane (the same per-lane order and butterfly as
// moe_down_bf16), eight rows' loads in flight per lane.
__device__ __forceinline__ void down_rows1(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                           const uint32_t* wrow, const uint32_t* arow, int H, int I, int h,
                                           int lane, float* acc) {
    const bf16* wd[DOWN1_EXPERTS];
    const bf16* ar[DOWN1_EXPERTS];
#pragma unroll
    for (int m = 0; m < DOWN1_EXPERTS; ++m) {
        wd[m] = w2 + ((size_t)wrow[m] * H + h) * I;
        ar[m] = act + (size_t)arow[m] * I;
        acc[m] = 0.f;
    }
#pragma unroll 2
    for (int k = lane * 8; k < I; k += 256) {
#pragma unroll
        for (int m = 0; m < DOWN1_EXPERTS; ++m)
            acc[m] = dot8(*reinterpret_cast<const uint4*>(wd[m] + k), *reinterpret_cast<const uint4*>(ar[m] + k), acc[m]);
    }
#pragma unroll
    for (int m = 0; m < DOWN1_EXPERTS; ++m) acc[m] = warp_sum(acc[m]);
}

// An expert's output rounded to bf16, times its bf16 router weight, as moe_down_bf16 writes it.
__device__ __forceinline__ float weighted1(float acc, uint32_t weight_bits) {
    return f(rn(f(rn(acc)) * f(rn(__uint_as_float(weight_bits)))));
}

extern "C" __global__ void moe_down_combine1_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                                  const uint32_t* __restrict__ tab, int G, int S, int H,
                                                  int I, bf16* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (h >= H) return;
    const uint32_t* weight = tab + 3 * G + 2 * S;
    bf16 sum = rn(0.f);
    for (int g0 = 0; g0 < G; g0 += DOWN1_EXPERTS) {
        uint32_t wrow[DOWN1_EXPERTS], arow[DOWN1_EXPERTS];
        float acc[DOWN1_EXPERTS];
#pragma unroll
        for (int m = 0; m < DOWN1_EXPERTS; ++m) {
            const int g = min(g0 + m, G - 1);
            wrow[m] = tab[g];
            arow[m] = tab[G + g];
        }
        down_rows1(act, w2, wrow, arow, H, I, h, lane, acc);
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < DOWN1_EXPERTS; ++m)
                if (g0 + m < G) sum = rn(f(sum) + weighted1(acc[m], weight[tab[G + g0 + m]]));
        }
    }
    if (lane == 0) out[h] = sum;
}

// The same from the router's top-k left on the GPU (see moe_gate_up1_bf16): lane m keeps expert
// m's weighted output and its rank by id; lane 0 then adds them in ascending id.
extern "C" __global__ void moe_down_combine1_routed_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                                         const uint32_t* __restrict__ routed, int k,
                                                         const uint32_t* __restrict__ row_of, int H, int I,
                                                         bf16* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (h >= H) return;
    int rank = ROUTED1_MAX_K;
    if (lane < k) {
        const uint32_t e = routed[lane];
        rank = 0;
        for (int j = 0; j < k; ++j) rank += routed[j] < e;
    }
    float mine = 0.f;
    for (int g0 = 0; g0 < k; g0 += DOWN1_EXPERTS) {
        uint32_t wrow[DOWN1_EXPERTS], arow[DOWN1_EXPERTS];
        float acc[DOWN1_EXPERTS];
#pragma unroll
        for (int m = 0; m < DOWN1_EXPERTS; ++m) {
            const int g = min(g0 + m, k - 1);
            wrow[m] = row_of[routed[g]];
            arow[m] = g;
        }
        down_rows1(act, w2, wrow, arow, H, I, h, lane, acc);
#pragma unroll
        for (int m = 0; m < DOWN1_EXPERTS; ++m)
            if (g0 + m < k && lane == g0 + m) mine = weighted1(acc[m], routed[k + lane]);
    }
    bf16 sum = rn(0.f);
    for (int r = 0; r < k; ++r) {
        const int src = __ffs(__ballot_sync(0xffffffffu, rank == r)) - 1;
        const float v = __shfl_sync(0xffffffffu, mine, src);
        sum = rn(f(sum) + v);
    }
    if (lane == 0) out[h] = sum;
}

// A routed call's batch-1 slots on a node (ops/cuda/moe.rs, `outputs_routed_into`): the two
// kernels above reading the coordinator's top-k as copied in, for the experts held here only
// (row_of[e] != NOT_HELD, e < E), no usage (the coordinator counts it), each slot's weighted
// output written to its row `slot` of the coordinator's [k, H] rows rather than summed: the
// table path's per-slot bits (moe_down_bf16's rounding), without its plan launch.
extern "C" __global__ void moe_gate_up1_held_bf16(const bf16* __restrict__ xs, const bf16* __restrict__ w13,
                                                  const uint32_t* __restrict__ routed,
                                                  const uint32_t* __restrict__ row_of, int E, int H, int I,
                                                  bf16* __restrict__ act) {
    const int i = blockIdx.y, lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const uint32_t e = routed[i];
    if (j >= I || e >= (uint32_t)E || row_of[e] == NOT_HELD) return;
    gate_up1_row(xs, w13, row_of[e], H, I, i, j, lane, act);
}

extern "C" __global__ void moe_down1_rows_held_bf16(const bf16* __restrict__ act, const bf16* __restrict__ w2,
                                                    const uint32_t* __restrict__ routed, int k,
                                                    const uint32_t* __restrict__ row_of, int E, int H, int I,
                                                    bf16* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (h >= H) return;
    for (int g0 = 0; g0 < k; g0 += DOWN1_EXPERTS) {
        uint32_t wrow[DOWN1_EXPERTS], arow[DOWN1_EXPERTS];
        bool held[DOWN1_EXPERTS];
        float acc[DOWN1_EXPERTS];
#pragma unroll
        for (int m = 0; m < DOWN1_EXPERTS; ++m) {
            const int g = min(g0 + m, k - 1);
            const uint32_t e = routed[g];
            held[m] = g0 + m < k && e < (uint32_t)E && row_of[e] != NOT_HELD;
            // A row of this node's experts either way: the loads stay in bounds.
            wrow[m] = held[m] ? row_of[e] : 0u;
            arow[m] = g;
        }
        down_rows1(act, w2, wrow, arow, H, I, h, lane, acc);
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < DOWN1_EXPERTS; ++m)
                if (held[m]) out[(size_t)(g0 + m) * H + h] = rn(weighted1(acc[m], routed[k + g0 + m]));
        }
    }
}

// y[t, j] = w_j . x[t] for a few rows x (decode's projections and routers): one warp per output
// j streams its weight row once for all T tokens, 16-byte loads, f32 accumulation, one bf16
// rounding (as cuBLAS's bf16 GEMM with f32 compute). x: [T, K], w: [N, K], y: [T, N].
template <int T>
__device__ __forceinline__ void gemv_rows(const bf16* __restrict__ x, const bf16* __restrict__ w, int N, int K,
                                          bf16* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= N) return;
    const bf16* wr = w + (size_t)j * K;
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.f;
#pragma unroll 4
    for (int k = lane * 8; k < K; k += 256) {
        const uint4 wv = *reinterpret_cast<const uint4*>(wr + k);
#pragma unroll
        for (int t = 0; t < T; ++t) acc[t] = dot8(wv, *reinterpret_cast<const uint4*>(x + (size_t)t * K + k), acc[t]);
    }
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = warp_sum(acc[t]);
    if (lane == 0) {
#pragma unroll
        for (int t = 0; t < T; ++t) y[(size_t)t * N + j] = rn(acc[t]);
    }
}

extern "C" __global__ void gemv_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, int m, int N,
                                     int K, bf16* __restrict__ y) {
    switch (m) {
        case 1: gemv_rows<1>(x, w, N, K, y); break;
        case 2: gemv_rows<2>(x, w, N, K, y); break;
        case 3: gemv_rows<3>(x, w, N, K, y); break;
        default: gemv_rows<4>(x, w, N, K, y); break;
    }
}



// Per-token sum of its experts' weighted outputs: ys [rows, H]; the rows of token t are
// idx[offsets[t] .. offsets[t+1]], in ascending expert id. Starts from zero and rounds to bf16
// after every add, as the reference's index_add_ into a zero tensor, expert by expert. A thread
// takes 8 columns (H a multiple of 8, rows 16-byte aligned) with one 16-byte load a row: one
// column a thread made it a third of the bandwidth's speed (12.2 µs for a 512-token prefill's
// 17 MB on an H200).
extern "C" __global__ void moe_combine_bf16(const bf16* __restrict__ ys, const uint32_t* __restrict__ offsets,
                                            const uint32_t* __restrict__ idx, int H,
                                            bf16* __restrict__ out) {
    const int t = blockIdx.y;
    const int h = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (h >= H) return;
    alignas(16) bf16 acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = rn(0.f);
    for (uint32_t i = offsets[t]; i < offsets[t + 1]; ++i) {
        const uint4 raw = *reinterpret_cast<const uint4*>(ys + (size_t)idx[i] * H + h);
        const bf16* y = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = rn(f(acc[e]) + f(y[e]));
    }
    *reinterpret_cast<uint4*>(out + (size_t)t * H + h) = *reinterpret_cast<const uint4*>(acc);
}

#include "attention.cuh"
#include "prefill_attention.cuh"
#include "sample.cuh"
#include "router.cuh"
#include "exchange.cuh"

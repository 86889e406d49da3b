// The MoE launch's routing tables built on the GPU from the router's top-k where it left it, so
// a batch's decode step or prefill needs no host round trip per layer (ops/cuda/moe.rs,
// `StackedExperts::forward_routed`). The same table as the host's (see the layout above
// moe_gate_up_bf16): a group per expert with tokens, the GEMV groups (fewer than `min_tokens`
// tokens) first and the tensor-core groups after them, each in ascending expert id; the tiles of
// the tensor-core groups; `live` = {GEMV groups, tiles}; and the combine table, each token's
// assignments in ascending expert id. Slots within a group are placed by atomics, so their order
// varies from run to run; every output row is computed from its own slot alone, so the outputs
// and the sums are the host table's bits all the same.

// Exclusive prefix sum over the block (one value per thread, blockDim.x a multiple of 32, at most
// 1024); `total` gets the sum on every thread. `warps` is 32 words of shared memory.
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t v, uint32_t* warps, uint32_t& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    uint32_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint32_t up = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += up;
    }
    if (lane == 31) warps[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        uint32_t w = lane < n_warps ? warps[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t up = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += up;
        }
        warps[lane] = w;
    }
    __syncthreads();
    const uint32_t before = (warp > 0 ? warps[warp - 1] : 0) + incl - v;
    total = warps[n_warps - 1];
    __syncthreads();
    return before;
}

// Experts `row_of` marks so are not held here (an expert node holding part of a layer, given the
// coordinator's whole routing): their slots get no group, and no output row is written for them.
#define NOT_HELD 0xffffffffu

// One block, blockDim.x >= E (a multiple of 32, at most 1024); dynamic shared memory 2E words.
// routed: the top-k of n tokens, ids [n*k] then weights' f32 bits [n*k]; row_of: stacked row of
// each of the E experts, NOT_HELD where not held (ids past E count as not held); usage: the
// layer's per-expert counts of held experts, added to (null: not counted). The combine table covers every slot. tab: 3G + 3S
// words (G >= the groups there can be, S = n*k); tiles: 2 words per tile; combine: n + 1 offsets
// then S indices.
extern "C" __global__ void moe_plan(const uint32_t* __restrict__ routed, const uint32_t* __restrict__ row_of,
                                    uint32_t* __restrict__ usage, int n, int k, int E, int G,
                                    int min_tokens, int tile_m, uint32_t* __restrict__ tab,
                                    uint32_t* __restrict__ tiles, uint32_t* __restrict__ live,
                                    uint32_t* __restrict__ combine) {
    extern __shared__ uint32_t plan_shared[];
    uint32_t* count = plan_shared;
    uint32_t* cursor = plan_shared + E;
    __shared__ uint32_t warps[32];
    const int S = n * k, tid = threadIdx.x;
    const uint32_t* ids = routed;
    const uint32_t* weights = routed + S;
    for (int e = tid; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int s = tid; s < S; s += blockDim.x) {
        const uint32_t e = ids[s];
        if (e < (uint32_t)E && row_of[e] != NOT_HELD) atomicAdd(&count[e], 1u);
    }
    __syncthreads();
    const uint32_t c = tid < E ? count[tid] : 0;
    const bool big = min_tokens > 0 && c >= (uint32_t)min_tokens;
    const bool small = c > 0 && !big;
    const uint32_t n_tiles_here = big ? (c + tile_m - 1) / tile_m : 0;
    uint32_t n_small, n_big, small_slots, big_slots, n_tiles;
    const uint32_t small_idx = block_exclusive_scan(small, warps, n_small);
    const uint32_t big_idx = block_exclusive_scan(big, warps, n_big);
    const uint32_t small_first = block_exclusive_scan(small ? c : 0, warps, small_slots);
    const uint32_t big_first = block_exclusive_scan(big ? c : 0, warps, big_slots);
    const uint32_t tile0 = block_exclusive_scan(n_tiles_here, warps, n_tiles);
    if (c > 0) {
        const uint32_t g = small ? small_idx : n_small + big_idx;
        const uint32_t first = small ? small_first : small_slots + big_first;
        tab[g] = row_of[tid];
        tab[G + g] = first;
        tab[2 * G + g] = c;
        cursor[tid] = first;
        for (uint32_t t = 0; t < n_tiles_here; ++t) {
            tiles[2 * (tile0 + t)] = g;
            tiles[2 * (tile0 + t) + 1] = t * tile_m;
        }
        if (usage) usage[tid] += c;
    }
    if (tid == 0) {
        live[0] = n_small;
        live[1] = n_tiles;
    }
    __syncthreads();
    uint32_t* offsets = combine;
    uint32_t* idx = combine + n + 1;
    for (int t = tid; t <= n; t += blockDim.x) offsets[t] = (uint32_t)t * k;
    for (int s = tid; s < S; s += blockDim.x) {
        const uint32_t e = ids[s];
        if (e < (uint32_t)E && row_of[e] != NOT_HELD) {
            const uint32_t pos = atomicAdd(&cursor[e], 1u);
            tab[3 * G + pos] = s / k;
            tab[3 * G + S + pos] = s;
            tab[3 * G + 2 * S + pos] = weights[s];
        }
        // The token's experts are distinct (topk_row takes each expert at most once): its rank
        // among them is its place in the sum, and the ranks fill the token's k entries.
        const int t0 = s - s % k;
        uint32_t rank = 0;
        for (int j = 0; j < k; ++j) rank += ids[t0 + j] < e;
        idx[t0 + rank] = s;
    }
}

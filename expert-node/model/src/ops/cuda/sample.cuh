// Choosing the next token on the GPU from rows of f32 logits, every row of a decode step in the
// same two launches (blockIdx.y is the row; included by kernels.cu; the Rust side is
// ops/cuda/sample.rs, the host sampler the coordinator's sampling/). Every reduction has one
// fixed order (fixed grid sizes; the argmax does not depend on the block size), so a row's
// result does not depend on the other rows or on the run.
//
// Steps, each over the whole vocabulary:
// 1. z = a copy of the logits with the CTRL repetition penalty (Keskar et al. 2019) applied to the
//    listed tokens (a token listed twice gets the same value twice: no de-duplication needed);
// 2. the argmax of z, ties to the lower index (torch.argmax): the greedy token, as partial
//    argmaxes over many blocks (one block streams 600 KB at a fraction of the GPU's bandwidth)
//    reduced by one;
// 3. with `gumbel`, the Gumbel-max trick (Gumbel 1954; Maddison et al. 2014): argmax of
//    z / T + G_i with G_i = -log(-log(U_i)) and U_i from a counter-based hash of (key, i), an
//    exact draw from softmax(z / T) with no sort (used when neither top-k nor top-p restricts);
// 4. otherwise the softmax denominator over every token and the `top` largest z by a radix select
//    on order-preserving keys (Alabi et al. 2012, "Fast k-selection algorithms for GPUs"), copied
//    out so the host can finish top-k / top-p exactly on a short sorted list.
//
// Per row, its header: [0] the token of step 2 or 3, [1] candidates found (may exceed cap),
// [2] max z (bits), [3] sum of exp((z - max) / T) (bits); and its candidates: cap values (bits),
// then cap indices.

// One row's settings, SAMPLE_ROW_WORDS 64-bit words each in the table the kernels take as a
// parameter, SAMPLE_ROWS rows per launch (sample.rs writes it; a parameter, not an upload, so
// nothing waits for the stream before the launch): the address of its z, the Gumbel key, the
// temperature's bits, `top`, and flags (1: Gumbel draw, 2: hand back candidates).
#define SAMPLE_ROW_WORDS 5
#define SAMPLE_ROWS 32
struct SampleTable {
    unsigned long long w[SAMPLE_ROW_WORDS * SAMPLE_ROWS];
};
struct SampleRow {
    const float* z;
    unsigned long long key;
    float temperature;
    int top;
    bool gumbel;
    bool candidates;
};
__device__ __forceinline__ SampleRow sample_row_at(const SampleTable& rows, int r) {
    const unsigned long long* w = rows.w + r * SAMPLE_ROW_WORDS;
    SampleRow p;
    p.z = reinterpret_cast<const float*>(w[0]);
    p.key = w[1];
    p.temperature = __uint_as_float((uint32_t)w[2]);
    p.top = (int)w[3];
    p.gumbel = (w[4] & 1) != 0;
    p.candidates = (w[4] & 2) != 0;
    return p;
}


__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// splitmix64's finaliser (Steele et al. 2014): a well-mixed 64-bit hash of a counter.
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// Block argmax of (v, i): the larger value, ties to the lower index. Every thread gets it.
__device__ void block_argmax(float& v, uint32_t& i) {
    __shared__ float vals[32];
    __shared__ uint32_t idxs[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    warp_argmax(v, i);
    if (lane == 0) {
        vals[warp] = v;
        idxs[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        const bool live = lane < (int)(blockDim.x >> 5);
        v = live ? vals[lane] : -INFINITY;
        i = live ? idxs[lane] : 0xffffffffu;
        warp_argmax(v, i);
        if (lane == 0) {
            vals[0] = v;
            idxs[0] = i;
        }
    }
    __syncthreads();
    v = vals[0];
    i = idxs[0];
    __syncthreads();
}

__device__ __forceinline__ float gumbel_score(float z, float temperature, unsigned long long key, uint32_t i) {
    // 24 random bits, centred in (0, 1): never 0 or 1, so both logs are finite.
    const float u = ((float)(mix64(key + (unsigned long long)i) >> 40) + 0.5f) * 0x1p-24f;
    return z / temperature - logf(-logf(u));
}

// The repetition penalty: z[t] from logits[t] (z a copy of them) for every listed token, once or
// more (repeats write the same value).
extern "C" __global__ void sample_penalize_f32(const float* __restrict__ logits, float* __restrict__ z, int V,
                                               const uint32_t* __restrict__ tokens, int n, float penalty) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const uint32_t t = tokens[j];
    if (t >= (uint32_t)V) return;
    const float l = logits[t];
    z[t] = l > 0.f ? l / penalty : l * penalty;
}

// Per block of row blockIdx.y (of the launch's rows): the argmax of its z (or with `gumbel` of the Gumbel scores) over
// a grid-stride slice, written as (value bits, index) to partial[2 * (row * gridDim.x + block)].
extern "C" __global__ void sample_argmax_partial_f32(const SampleTable rows, int V,
                                                     uint32_t* __restrict__ partial) {
    const SampleRow p = sample_row_at(rows, blockIdx.y);
    const float* __restrict__ z = p.z;
    float best = -INFINITY;
    uint32_t at = 0xffffffffu;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < V; i += gridDim.x * blockDim.x) {
        const float v = p.gumbel ? gumbel_score(z[i], p.temperature, p.key, i) : z[i];
        if (v > best || at == 0xffffffffu) {
            best = v;
            at = i;
        }
    }
    block_argmax(best, at);
    if (threadIdx.x == 0) {
        const size_t b = (size_t)blockIdx.y * gridDim.x + blockIdx.x;
        partial[2 * b] = __float_as_uint(best);
        partial[2 * b + 1] = at;
    }
}

// One block per row: the token from the row's partial argmaxes; then, for sampling restricted by
// top-k or top-p, the softmax denominator and the `top` largest z (see the header). The block has
// 1,024 threads when any row wants candidates; the argmax is the same with any number.
extern "C" __global__ void sample_row_f32(const SampleTable rows, int V,
                                          const uint32_t* __restrict__ partial, int n_partial, int cap,
                                          uint32_t* __restrict__ headers, uint32_t* __restrict__ candidates) {
    const SampleRow p = sample_row_at(rows, blockIdx.y);
    const float* __restrict__ z = p.z;
    const float temperature = p.temperature;
    const int top = p.top;
    uint32_t* out = headers + 4 * (size_t)blockIdx.y;
    partial += 2 * (size_t)blockIdx.y * n_partial;
    const int tid = threadIdx.x;
    float best = -INFINITY;
    uint32_t at = 0xffffffffu;
    for (int b = tid; b < n_partial; b += blockDim.x) {
        const float v = __uint_as_float(partial[2 * b]);
        const uint32_t i = partial[2 * b + 1];
        if (i != 0xffffffffu && (v > best || (v == best && i < at) || at == 0xffffffffu)) {
            best = v;
            at = i;
        }
    }
    block_argmax(best, at);
    if (!p.candidates) {
        if (tid == 0) {
            out[0] = at;
            out[1] = 0;
            out[2] = __float_as_uint(best);
            out[3] = 0;
        }
        return;
    }
    const float max = best;

    float s = 0.f;
    for (int i = tid; i < V; i += blockDim.x) s += expf((z[i] - max) / temperature);
    s = block_sum(s);

    // Radix select, most significant byte first: after the passes, `prefix` is the key of the
    // top-th largest z; `want` how many of the elements equal to it belong to the top.
    __shared__ uint32_t hist[256];
    __shared__ uint32_t prefix_s, want_s, found;
    if (tid == 0) {
        prefix_s = 0;
        want_s = (uint32_t)min(top, V);
        found = 0;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        const uint32_t prefix = prefix_s;
        for (int i = tid; i < V; i += blockDim.x) {
            const uint32_t k = order_key(z[i]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t want = want_s, b = 255;
            for (;; --b) {
                if (hist[b] >= want || b == 0) break;
                want -= hist[b];
            }
            prefix_s = prefix | (b << shift);
            want_s = want;
        }
        mask |= 255u << shift;
        __syncthreads();
    }
    const uint32_t threshold = prefix_s;
    uint32_t* values = candidates + 2 * (size_t)blockIdx.y * cap;
    uint32_t* indices = values + cap;
    for (int i = tid; i < V; i += blockDim.x) {
        if (order_key(z[i]) >= threshold) {
            const uint32_t slot = atomicAdd(&found, 1u);
            if (slot < (uint32_t)cap) {
                values[slot] = __float_as_uint(z[i]);
                indices[slot] = i;
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        out[0] = at;
        out[1] = found;
        out[2] = __float_as_uint(max);
        out[3] = __float_as_uint(s);
    }
}

// Included by kernels.cu (after its helpers f, rn, warp_sum, block_sum and dot8): the decoder
// layer's norms, RMSNorm (with the residual add before it) and q/k norm + RoPE.
#pragma once

// Elements of a row each thread keeps in registers: rows up to NORM_PER * blockDim.x are read
// from memory once (longer rows are re-read in a second pass).
#define NORM_PER 8

// RMSNorm of each row (Qwen3OmniMoeThinkerTextRMSNorm): the norm in f32, cast to bf16, then
// times the weight in bf16. One block per row; with `r`, the row is first x + r in bf16 (the
// decoder layer's residual add), written to `sum`.
__device__ __forceinline__ void norm_row(const bf16* __restrict__ x, const bf16* __restrict__ r,
                                         const bf16* __restrict__ w, bf16* __restrict__ sum,
                                         bf16* __restrict__ out, int dim, float eps) {
    const size_t base = (size_t)blockIdx.x * dim;
    auto load = [&](int j) {
        if (r == nullptr) return f(x[base + j]);
        const bf16 h = rn(f(x[base + j]) + f(r[base + j]));
        sum[base + j] = h;
        return f(h);
    };
    float v[NORM_PER];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        v[i] = j < dim ? load(j) : 0.f;
        ss = fmaf(v[i], v[i], ss);
    }
    for (int j = threadIdx.x + NORM_PER * blockDim.x; j < dim; j += blockDim.x) {
        const float t = load(j);
        ss = fmaf(t, t, ss);
    }
    const float inv = 1.0f / sqrtf(block_sum(ss) / (float)dim + eps);
#pragma unroll
    for (int i = 0; i < NORM_PER; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        if (j < dim) out[base + j] = rn(f(rn(v[i] * inv)) * f(w[j]));
    }
    for (int j = threadIdx.x + NORM_PER * blockDim.x; j < dim; j += blockDim.x) {
        const float t = r == nullptr ? f(x[base + j]) : f(sum[base + j]);
        out[base + j] = rn(f(rn(t * inv)) * f(w[j]));
    }
}

// The same for rows of at most 8 * blockDim.x elements, a multiple of 8, 16-byte aligned: each
// thread takes one 16-byte chunk, so every load of the row and the weight is in flight at once
// (one round trip to memory, where the strided loop above waited on several). The squares are
// summed chunk by chunk, so the bits differ from norm_row's; one of the two serves each shape.
__device__ __forceinline__ void norm_row8(const bf16* __restrict__ x, const bf16* __restrict__ r,
                                          const bf16* __restrict__ w, bf16* __restrict__ sum,
                                          bf16* __restrict__ out, int dim, float eps) {
    const size_t at = (size_t)blockIdx.x * dim + threadIdx.x * 8;
    const bool live = (int)threadIdx.x * 8 < dim;
    float v[8];
    uint4 wv = make_uint4(0, 0, 0, 0);
    float ss = 0.f;
    if (live) {
        wv = *reinterpret_cast<const uint4*>(w + threadIdx.x * 8);
        uint4 xv = *reinterpret_cast<const uint4*>(x + at);
        if (r != nullptr) {
            const uint4 rv = *reinterpret_cast<const uint4*>(r + at);
            __nv_bfloat162* px = reinterpret_cast<__nv_bfloat162*>(&xv);
            const __nv_bfloat162* pr = reinterpret_cast<const __nv_bfloat162*>(&rv);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float2 a = __bfloat1622float2(px[i]), b = __bfloat1622float2(pr[i]);
                px[i] = __halves2bfloat162(rn(a.x + b.x), rn(a.y + b.y));
            }
            *reinterpret_cast<uint4*>(sum + at) = xv;
        }
        const __nv_bfloat162* px = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 a = __bfloat1622float2(px[i]);
            v[2 * i] = a.x;
            v[2 * i + 1] = a.y;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) ss = fmaf(v[i], v[i], ss);
    }
    const float inv = 1.0f / sqrtf(block_sum(ss) / (float)dim + eps);
    if (!live) return;
    uint4 ov;
    __nv_bfloat162* po = reinterpret_cast<__nv_bfloat162*>(&ov);
    const __nv_bfloat162* pw = reinterpret_cast<const __nv_bfloat162*>(&wv);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 g = __bfloat1622float2(pw[i]);
        po[i] = __halves2bfloat162(rn(f(rn(v[2 * i] * inv)) * g.x), rn(f(rn(v[2 * i + 1] * inv)) * g.y));
    }
    *reinterpret_cast<uint4*>(out + at) = ov;
}

// norm_row8 where the row fits it, else norm_row.
__device__ __forceinline__ void norm_any(const bf16* __restrict__ x, const bf16* __restrict__ r,
                                         const bf16* __restrict__ w, bf16* __restrict__ sum,
                                         bf16* __restrict__ out, int dim, float eps) {
    if ((dim & 7) == 0 && dim <= 8 * (int)blockDim.x)
        norm_row8(x, r, w, sum, out, dim, eps);
    else
        norm_row(x, r, w, sum, out, dim, eps);
}

extern "C" __global__ void rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         bf16* __restrict__ out, int dim, float eps) {
    norm_any(x, nullptr, w, nullptr, out, dim, eps);
}

// The residual add then RMSNorm of the decoder layer: h = x + r in bf16 (written to `sum`), then
// normed = RMSNorm(h) as `rms_norm_bf16`.
extern "C" __global__ void add_rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ r,
                                             const bf16* __restrict__ w, bf16* __restrict__ sum,
                                             bf16* __restrict__ out, int dim, float eps) {
    norm_any(x, r, w, sum, out, dim, eps);
}

// q_norm and k_norm, then RoPE (rotate_half), of every q and k head of every token in one launch,
// one warp per (token, head) row of d = 32 * W elements, lane l holding elements l + 32 w: x holds
// each token's q heads then its k heads at x[token * x_stride + head * d] (the q and k columns of
// the stacked q/k/v projection, read in place); heads below q_heads take wq and go to out_q
// [tokens, q_heads, d], the others wk and out_k [tokens, k_heads, d] — or, with `heads_first`,
// [q_heads, tokens, d] and [k_heads, tokens, d], the layout prefill attention reads (no
// transposing copy after); cos/sin [tokens, d]. The rotation rounds as the reference's
// `q * cos + rotate_half(q) * sin` in bf16: each product, then the sum.
//
// The sum of squares is `block_sum`'s over a block of d threads, replayed in one warp: each w's
// butterfly is that block's warp w's, and the butterfly over their partials (zeros past W, which
// add nothing) runs in registers in the same order — the same bits as a block per row, which
// for a 512-token prefill was 20,480 blocks of 128 threads and three barriers each (17.7 µs a
// layer on an H200).
template <int W>
__device__ __forceinline__ void norm_rope_row(const bf16* __restrict__ x, const bf16* __restrict__ wt,
                                              const bf16* __restrict__ cos, const bf16* __restrict__ sin,
                                              bf16* __restrict__ out, float eps) {
    constexpr int d = 32 * W;
    const int lane = threadIdx.x & 31;
    float v[W], part[W];
#pragma unroll
    for (int w = 0; w < W; ++w) {
        v[w] = f(x[lane + 32 * w]);
        part[w] = warp_sum(v[w] * v[w]);
    }
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
        float next[W];
#pragma unroll
        for (int l = 0; l < W; ++l) next[l] = part[l] + part[l ^ o];
#pragma unroll
        for (int l = 0; l < W; ++l) part[l] = next[l];
    }
    const float inv = 1.0f / sqrtf(part[0] / (float)d + eps);
    bf16 nv[W];
#pragma unroll
    for (int w = 0; w < W; ++w) nv[w] = rn(f(rn(v[w] * inv)) * f(wt[lane + 32 * w]));
#pragma unroll
    for (int w = 0; w < W; ++w) {
        // Element j's partner j +- d/2: another of the lane's registers, or at d = 32 the lane
        // 16 away.
        float rot;
        if constexpr (W == 1) {
            const float other = __shfl_xor_sync(0xffffffffu, f(nv[0]), 16);
            rot = lane < 16 ? -other : other;
        } else {
            rot = w < W / 2 ? -f(nv[w + W / 2]) : f(nv[w - W / 2]);
        }
        const int j = lane + 32 * w;
        out[j] = rn(f(rn(f(nv[w]) * f(cos[j]))) + f(rn(rot * f(sin[j]))));
    }
}

// Head sizes the kernel takes (mod.rs: `NORM_ROPE_HEAD_DIMS`); 4 rows a block of 128 threads.
extern "C" __global__ void norm_rope_bf16(const bf16* __restrict__ x, const bf16* __restrict__ wq,
                                          const bf16* __restrict__ wk, const bf16* __restrict__ cos,
                                          const bf16* __restrict__ sin, bf16* __restrict__ out_q,
                                          bf16* __restrict__ out_k, int tokens, int q_heads, int k_heads,
                                          int d, int x_stride, float eps, int heads_first) {
    const int heads = q_heads + k_heads;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)tokens * heads) return;
    const size_t token = row / heads;
    const int head = row % heads;
    const bool is_q = head < q_heads;
    const size_t h = is_q ? head : head - q_heads, of = is_q ? q_heads : k_heads;
    bf16* out = (is_q ? out_q : out_k) + (heads_first ? h * tokens + token : token * of + h) * d;
    const bf16* in = x + token * x_stride + (size_t)head * d;
    const bf16* wt = is_q ? wq : wk;
    const bf16 *c = cos + token * d, *s = sin + token * d;
    switch (d) {
        case 32: norm_rope_row<1>(in, wt, c, s, out, eps); break;
        case 64: norm_rope_row<2>(in, wt, c, s, out, eps); break;
        case 128: norm_rope_row<4>(in, wt, c, s, out, eps); break;
        case 256: norm_rope_row<8>(in, wt, c, s, out, eps); break;
    }
}

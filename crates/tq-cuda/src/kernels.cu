// turboquant CUDA kernels, compiled at run time by NVRTC (see src/gpu.rs).
//
// The host prepends a configuration block of #defines:
//   D      head dimension (64 or 128)
//   G      query heads per KV head (GQA group)
//   NQ     query tokens per sequence (1 = plain decode; 2..8 = a step that
//          verifies several tokens, each seeing the cache up to itself)
//   RB     score rows (query token x head) one attention block takes; the
//          NR = G*NQ rows of a KV head are split into NGR blocks of RB
//   KVSAME 1 when K and V share one codebook (one pair table serves both)
//   KMODE, VMODE   0 = TurboQuant (codebook + f32 norm), 1 = q4_0, 2 = q8_0
//   KB, VB         bits per coordinate of the K and V codes
//   ROTK, ROTV     1 when the side is Hadamard-rotated (TurboQuant)
// Compiled with --fmad=false so the encoder performs exactly the IEEE
// operations of the CPU reference (tq-core's scalar kernels), in the same
// order: the codes it writes are the CPU's bytes.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;

#define NT 128          // threads per attention block
#define TILE 128        // tokens per tile (one per thread in the score phase)
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// ---------------------------------------------------------------------------
// Unnormalized fast Walsh-Hadamard transform of `rows` rows of n values in
// shared memory, all threads of the block taking part. Butterfly order as
// tq-core's fwht_ref (h = 1, 2, 4, ...; a+b, a-b), so results are identical.
// ---------------------------------------------------------------------------
__device__ void fwht_smem(float* x, int n, int rows) {
    int half = n / 2;
    for (int h = 1; h < n; h *= 2) {
        __syncthreads();
        for (int p = threadIdx.x; p < rows * half; p += blockDim.x) {
            int r = p / half, q = p % half;
            int i = r * n + (q / h) * 2 * h + (q % h);
            float a = x[i], b = x[i + h];
            x[i] = __fadd_rn(a, b);
            x[i + h] = __fsub_rn(a, b);
        }
    }
    __syncthreads();
}

__device__ void xor_signs(float* x, const u32* s, int n, int rows) {
    for (int p = threadIdx.x; p < rows * n; p += blockDim.x)
        x[p] = __int_as_float(__float_as_int(x[p]) ^ s[p % n]);
    __syncthreads();
}

// y <- total * H(s2 . H(s1 . y))   (tq-core Hadamard::rotate for powers of two)
__device__ void rotate_smem(float* x, const u32* s1, const u32* s2, float total, int n, int rows) {
    xor_signs(x, s1, n, rows);
    fwht_smem(x, n, rows);
    xor_signs(x, s2, n, rows);
    fwht_smem(x, n, rows);
    for (int p = threadIdx.x; p < rows * n; p += blockDim.x) x[p] = __fmul_rn(x[p], total);
    __syncthreads();
}

// y <- total * s1 . H(s2 . H(y))   (the inverse)
__device__ void unrotate_smem(float* x, const u32* s1, const u32* s2, float total, int n, int rows) {
    fwht_smem(x, n, rows);
    xor_signs(x, s2, n, rows);
    fwht_smem(x, n, rows);
    xor_signs(x, s1, n, rows);
    for (int p = threadIdx.x; p < rows * n; p += blockDim.x) x[p] = __fmul_rn(x[p], total);
    __syncthreads();
}

// ---------------------------------------------------------------------------
// Encode: tq-mse-B(-nc) for a batch of vectors, one block of D threads per
// vector. Output planes: codes [n][D*B/8] bytes (LSB-first bit stream) and
// scales [n] f32 (the norm, or norm/<u, u_hat> with norm correction).
// ---------------------------------------------------------------------------
// Block v < n encodes xs[v·D..][..D], vector t = v % per of sequence
// s = v / per, into slot s·cap + slot of the planes: slot t, or with `lens`
// (one length per batch entry, sequences s = batch·heads + head, already
// counting these `per` tokens) slot lens[s / heads] − per + t; a slot outside
// [0, cap) is not written. bf16: the scale is stored rounded to bf16 (round
// to nearest even, as the CPU KV cache stores it), widened back to f32.
extern "C" __global__ void tq_encode(const float* __restrict__ xs, int n, int per, int cap, int heads,
                                     const int* __restrict__ lens, const u32* __restrict__ s1,
                                     const u32* __restrict__ s2, float total, const float* __restrict__ boundaries,
                                     const float* __restrict__ centroids, int bits, int nc, int bf16,
                                     u8* __restrict__ codes, float* __restrict__ scales) {
    __shared__ float y[D];
    __shared__ float lanes[8];
    __shared__ float s_norm;
    __shared__ int s_mode;  // 0: normal path, 1: zero vector
    __shared__ u8 idx[D];
    int v = blockIdx.x;
    if (v >= n) return;
    int seq = v / per, t = v % per;
    int slot = lens ? lens[seq / heads] - per + t : t;
    if (slot < 0 || slot >= cap) return;
    u64 dst = (u64)seq * cap + slot;
    int j = threadIdx.x;
    y[j] = xs[(u64)v * D + j];
    rotate_smem(y, s1, s2, total, D, 1);
    // sum of squares in the canonical order: lane k = indices = k mod 8, in order
    if (j < 8) {
        float l = 0.0f;
        for (int i = j; i < D; i += 8) l = __fadd_rn(l, __fmul_rn(y[i], y[i]));
        lanes[j] = l;
    }
    __syncthreads();
    if (j == 0) {
        float s = __fadd_rn(__fadd_rn(__fadd_rn(lanes[0], lanes[1]), __fadd_rn(lanes[2], lanes[3])),
                            __fadd_rn(__fadd_rn(lanes[4], lanes[5]), __fadd_rn(lanes[6], lanes[7])));
        bool normal = s >= 1.17549435e-38f && s <= 3.40282347e38f;
        float norm;
        if (normal) {
            norm = __fsqrt_rn(s);
        } else {
            double t = 0.0;
            for (int i = 0; i < D; i++) t = __dadd_rn(t, __dmul_rn((double)y[i], (double)y[i]));
            norm = __double2float_rn(__dsqrt_rn(t));
        }
        s_norm = norm;
        s_mode = norm == 0.0f ? 1 : 0;
    }
    __syncthreads();
    float norm = s_norm;
    int q = 0;
    if (s_mode == 0) {
        float inv = __fdiv_rn(1.0f, norm);
        float u = isfinite(inv) ? __fmul_rn(y[j], inv) : __fdiv_rn(y[j], norm);
        y[j] = u;
        int nb = (1 << bits) - 1;
        for (int k = 0; k < nb; k++) q += boundaries[k] < u ? 1 : 0;
    }
    idx[j] = (u8)q;
    __syncthreads();
    if (j == 0) {
        float scale = norm;
        if (s_mode == 1) {
            scale = 0.0f;
        } else if (nc) {
            float l[8];
            for (int k = 0; k < 8; k++) l[k] = 0.0f;
            for (int i = 0; i < D; i++) l[i % 8] = __fadd_rn(l[i % 8], __fmul_rn(y[i], centroids[idx[i]]));
            float d = __fadd_rn(__fadd_rn(__fadd_rn(l[0], l[1]), __fadd_rn(l[2], l[3])),
                                __fadd_rn(__fadd_rn(l[4], l[5]), __fadd_rn(l[6], l[7])));
            scale = __fdiv_rn(norm, d);
        }
        if (bf16) {
            u32 u = __float_as_uint(scale);
            if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u);
            else if (u & 0x007fffffu) u |= 0x00400000u;  // NaN stays NaN
            scale = __uint_as_float(u & 0xffff0000u);
        }
        scales[dst] = scale;
    }
    // pack: thread j < D*bits/8 writes byte j
    int nbytes = D * bits / 8;
    if (j < nbytes) {
        u32 byte = 0;
        int b0 = j * 8;
        for (int b = 0; b < 8; b++) {
            int bit = b0 + b;
            int f = bit / bits, o = bit % bits;
            byte |= ((idx[f] >> o) & 1u) << b;
        }
        codes[dst * nbytes + j] = (u8)byte;
    }
}

// Random fill for benchmarks (a hash of the index: deterministic, any grid).
__device__ __forceinline__ u32 mix32(u64 x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (u32)x;
}
extern "C" __global__ void fill_random(u32* p, u64 n, u32 seed) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        p[i] = mix32(i * 0x9E3779B97F4A7C15ULL + seed);
}
// Positive scales: f32 norms in [0.5, 1.5) or f16 block scales in [0.005, 0.015).
extern "C" __global__ void fill_scales(void* p, u64 n, int f16, u32 seed) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float u = (mix32(i * 0x9E3779B97F4A7C15ULL + seed) >> 8) * (1.0f / 16777216.0f);
        if (f16) {
            unsigned short h;
            float x = 0.005f + 0.01f * u;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
            ((unsigned short*)p)[i] = h;
        } else {
            ((float*)p)[i] = 0.5f + u;
        }
    }
}

#ifdef ATTENTION
// ---------------------------------------------------------------------------
// Fused decode attention (flash-decoding). Grid: (splits, kv_heads * NGR,
// batch). A block takes RB score rows of one KV head: row i of the head is
// query token i / G, head i % G of the group (NR = G * NQ rows in all); query
// token i of NQ sees the first len - NQ + 1 + i cached tokens (the step's own
// tokens are the last NQ of the cache).
// SIMT kernel (tq_attend), block of NT threads; each split walks its tokens in
// tiles of TILE:
//   1. the rows' queries, rotated (K's rotation) and scaled by 1/sqrt(D) by
//      tq_prep_q, are read into shared memory;
//   2. per tile: codes are copied to shared memory (rows padded to an odd
//      number of words: conflict-free), thread t scores token t for all rows
//      straight from the codes, a warp per row updates the running max / sum
//      (online softmax), and values are accumulated from their codes in V's
//      rotated domain (8 coordinates per thread, tokens spread over
//      NT/(D/8) thread groups); the next tile's codes are loaded into
//      registers while this one is computed;
//   3. the unnormalized partial output, max and sum of the split are written;
//      `combine` merges the splits and rotates back once.
// Cache planes per side: codes [B][H][cap][P] bytes; scales: TurboQuant
// [B][H][cap] f32, ggml [B][H][cap][D/32] f16. Prepared queries and partial
// results are indexed by (sequence-head, row): qr [B][H][NR][D], partials
// [B][H][NR][splits].
// ---------------------------------------------------------------------------
#define NR (G * NQ)
#define NGR ((NR + RB - 1) / RB)
#define PK (D * KB / 8)
#define PV (D * VB / 8)
#define RSW(p) ((((p) / 4) % 2 == 0) ? ((p) / 4 + 1) : ((p) / 4))
#define KRS RSW(PK)
#define VRS RSW(PV)
#define NBLK (D / 32)
#define KSC (KMODE == 0 ? 1 : NBLK)  // scales per token
#define VSC (VMODE == 0 ? 1 : NBLK)
#define KVEC ((TILE * PK / 16 + NT - 1) / NT)  // 16-byte loads per thread per tile
#define VVEC ((TILE * PV / 16 + NT - 1) / NT)
#define CH (D / 8)          // 8-coordinate chunks per vector
#define GROUPS (NT / CH)    // token groups in the value phase

// Tokens [0, limit) of the cache that score row `row` (of NR) sees, clipped to
// the split's end; rows past NR (padding of the last row block) see the split.
__device__ __forceinline__ int row_limit(int row, int len, int t_end) {
    return row < NR ? min(t_end, len - NQ + 1 + row / G) : t_end;
}

__device__ __forceinline__ float kdecode(u32 f, const float* tab) {
#if KMODE == 0
    return tab[f];
#elif KMODE == 1
    return (float)((int)f - 8);
#else
    return (float)(signed char)f;
#endif
}
__device__ __forceinline__ float vdecode(u32 f, const float* tab) {
#if VMODE == 0
    return tab[f];
#elif VMODE == 1
    return (float)((int)f - 8);
#else
    return (float)(signed char)f;
#endif
}

#define LOAD_TILE(T0_) do { \
_Pragma("unroll") \
        for (int r = 0; r < KVEC; r++) { \
            int i = tid + r * NT; \
            if (i < TILE * PK / 16) kreg[r] = ((const uint4*)(kcs + (u64)(T0_) * PK))[i]; \
        } \
_Pragma("unroll") \
        for (int r = 0; r < VVEC; r++) { \
            int i = tid + r * NT; \
            if (i < TILE * PV / 16) vreg[r] = ((const uint4*)(vcs + (u64)(T0_) * PV))[i]; \
        } \
        int t = (T0_) + tid; \
        if (KMODE == 0) kscr[0] = ((const float*)ks)[seq * cap + t]; \
        else for (int c = 0; c < KSC; c++) kscr[c] = h2f(((const u16*)ks)[(seq * cap + t) * NBLK + c]); \
        if (VMODE == 0) vscr[0] = ((const float*)vs)[seq * cap + t]; \
        else for (int c = 0; c < VSC; c++) vscr[c] = h2f(((const u16*)vs)[(seq * cap + t) * NBLK + c]); \
} while (0)
#define STORE_TILE() do { \
_Pragma("unroll") \
        for (int r = 0; r < KVEC; r++) { \
            int i = tid + r * NT; \
            if (i < TILE * PK / 16) { \
                u32 w[4] = {kreg[r].x, kreg[r].y, kreg[r].z, kreg[r].w}; \
_Pragma("unroll") \
                for (int e = 0; e < 4; e++) { \
                    int wi = i * 4 + e; \
                    ktile[(wi / (PK / 4)) * KRS + wi % (PK / 4)] = w[e]; \
                } \
            } \
        } \
_Pragma("unroll") \
        for (int r = 0; r < VVEC; r++) { \
            int i = tid + r * NT; \
            if (i < TILE * PV / 16) { \
                u32 w[4] = {vreg[r].x, vreg[r].y, vreg[r].z, vreg[r].w}; \
_Pragma("unroll") \
                for (int e = 0; e < 4; e++) { \
                    int wi = i * 4 + e; \
                    vtile[(wi / (PV / 4)) * VRS + wi % (PV / 4)] = w[e]; \
                } \
            } \
        } \
_Pragma("unroll") \
        for (int c = 0; c < VSC; c++) vscl[tid * VSC + c] = vscr[c]; \
} while (0)

// Rotate (K's rotation) and scale (1/sqrt(D)) the queries once per step and
// order them by (sequence-head, row): grid B*kv_heads, block NT; q is
// [B][NQ][Hq][D], qr [B][kv_heads][NR][D].
#define PREP_ROWS 8
extern "C" __global__ void __launch_bounds__(NT) tq_prep_q(const float* __restrict__ q, const u32* __restrict__ ks1,
                                                         const u32* __restrict__ ks2, float ktotal, int kv_heads,
                                                         float* __restrict__ qr) {
    __shared__ float x[PREP_ROWS * D];
    int b = blockIdx.x / kv_heads, h = blockIdx.x % kv_heads, Hq = kv_heads * G;
    float sc = rsqrtf((float)D);
    for (int r0 = 0; r0 < NR; r0 += PREP_ROWS) {
        int rows = min(PREP_ROWS, NR - r0);
        __syncthreads();
        for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
            int row = r0 + i / D;
            x[i] = q[(((u64)b * NQ + row / G) * Hq + h * G + row % G) * D + i % D];
        }
        __syncthreads();
#if ROTK
        rotate_smem(x, ks1, ks2, ktotal, D, rows);
#endif
        for (int i = threadIdx.x; i < rows * D; i += blockDim.x) qr[((u64)blockIdx.x * NR + r0) * D + i] = x[i] * sc;
    }
}

extern "C" __global__ void __launch_bounds__(NT) tq_attend(
    const float* __restrict__ q,        // [B][H][NR][D], rotated and scaled (tq_prep_q)
    const u8* __restrict__ kc, const void* __restrict__ ks,
    const u8* __restrict__ vc, const void* __restrict__ vs,
    const int* __restrict__ lens, int cap, int kv_heads, int split_len,
    const u32* __restrict__ ks1, const u32* __restrict__ ks2, float ktotal, const float* __restrict__ ktab_g,
    const float* __restrict__ vtab_g,
    float* __restrict__ po, float* __restrict__ pm, float* __restrict__ pl) {
    extern __shared__ __align__(16) u32 smem[];
    u32* ktile = smem;                                   // TILE*KRS (+1) words
    u32* vtile = ktile + TILE * KRS + 4;                 // TILE*VRS (+1) words
    float* vscl = (float*)(vtile + TILE * VRS + 4);      // TILE*VSC
    float* sc = vscl + TILE * VSC;                       // RB*TILE scores, then weights
    float* qr = sc + RB * TILE;                          // RB*D
    float* ktab = qr + RB * D;                           // 256
    float* vtab = ktab + 256;                            // 256
    float* corr = vtab + 256;                            // RB
    float* mrun = corr + RB;                             // RB
    float* lrun = mrun + RB;                             // RB

    int split = blockIdx.x, h = blockIdx.y / NGR, row0 = (blockIdx.y % NGR) * RB, b = blockIdx.z;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int len = min(lens[b], cap);  // never a slot past the planes
    int t_begin = split * split_len;
    int t_end = min(len, t_begin + split_len);
    int nsplit = gridDim.x;

    u64 seq = (u64)b * kv_heads + h;
    const u8* kcs = kc + seq * cap * PK;
    const u8* vcs = vc + seq * cap * PV;

    for (int i = tid; i < 256; i += NT) {
        ktab[i] = KMODE == 0 && i < (1 << KB) ? ktab_g[i] : 0.0f;
        vtab[i] = VMODE == 0 && i < (1 << VB) ? vtab_g[i] : 0.0f;
    }
    for (int i = tid; i < RB * D; i += NT) qr[i] = row0 + i / D < NR ? q[(seq * NR + row0) * D + i] : 0.0f;
    if (tid < RB) { mrun[tid] = NEG_INF; lrun[tid] = 0.0f; }
    __syncthreads();

    float acc[RB][8];
#pragma unroll
    for (int g = 0; g < RB; g++)
#pragma unroll
        for (int k = 0; k < 8; k++) acc[g][k] = 0.0f;

    int chunk = tid % CH, grp = tid / CH;

    // register staging of one tile
    uint4 kreg[KVEC], vreg[VVEC];
    float kscr[KSC], vscr[VSC];

    if (t_begin < t_end) LOAD_TILE(t_begin);
    for (int t0 = t_begin; t0 < t_end; t0 += TILE) {
        int nvalid = min(TILE, t_end - t0);
        float kscale[KSC];
#pragma unroll
        for (int c = 0; c < KSC; c++) kscale[c] = kscr[c];
        STORE_TILE();
        __syncthreads();
        if (t0 + TILE < t_end) LOAD_TILE(t0 + TILE);  // in flight during this tile

        // ---- scores: thread tid <-> token t0 + tid ----
        if (tid < nvalid) {
            float s[RB];
#pragma unroll
            for (int g = 0; g < RB; g++) s[g] = 0.0f;
            const u32* row = ktile + tid * KRS;
#pragma unroll
            for (int c = 0; c < NBLK; c++) {  // 32 coordinates = KB words
                u32 w[KB + 1];
#pragma unroll
                for (int i = 0; i < KB; i++) w[i] = row[c * KB + i];
                w[KB] = 0;
                float part[RB];
#pragma unroll
                for (int g = 0; g < RB; g++) part[g] = 0.0f;
#pragma unroll
                for (int k = 0; k < 32; k += 4) {
                    float x[4];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int bit = (k + e) * KB;
                        int wi = bit >> 5, sh = bit & 31;
                        u32 f = w[wi] >> sh;
                        if (sh + KB > 32) f |= w[wi + 1] << (32 - sh);
                        x[e] = kdecode(f & ((1u << KB) - 1), ktab);
                    }
#pragma unroll
                    for (int g = 0; g < RB; g++) {
                        float4 qq = ((const float4*)(qr + g * D))[(c * 32 + k) / 4];
                        part[g] += qq.x * x[0] + qq.y * x[1] + qq.z * x[2] + qq.w * x[3];
                    }
                }
#pragma unroll
                for (int g = 0; g < RB; g++) s[g] += KMODE == 0 ? part[g] : part[g] * kscale[c];
            }
#pragma unroll
            for (int g = 0; g < RB; g++) {
                bool seen = t0 + tid < row_limit(row0 + g, len, t_end);
                sc[g * TILE + tid] = seen ? (KMODE == 0 ? s[g] * kscale[0] : s[g]) : NEG_INF;
            }
        } else {
#pragma unroll
            for (int g = 0; g < RB; g++) sc[g * TILE + tid] = NEG_INF;
        }
        __syncthreads();

        // ---- online softmax: a warp per row ----
        for (int g = warp; g < RB; g += NT / 32) {
            float v[TILE / 32];
            float mx = NEG_INF;
#pragma unroll
            for (int i = 0; i < TILE / 32; i++) { v[i] = sc[g * TILE + lane + 32 * i]; mx = fmaxf(mx, v[i]); }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float mold = mrun[g];
            float mnew = fmaxf(mold, mx);
            float msafe = mnew == NEG_INF ? 0.0f : mnew;  // a row that has seen no token yet
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < TILE / 32; i++) {
                int t = lane + 32 * i;
                float p = __expf(v[i] - msafe);
                sum += p;
                sc[g * TILE + t] = VMODE == 0 ? p * vscl[t] : p;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            __syncwarp();
            if (lane == 0) {
                float cf = __expf(mold - msafe);
                corr[g] = cf;
                mrun[g] = mnew;
                lrun[g] = lrun[g] * cf + sum;
            }
        }
        __syncthreads();

        // ---- values: 8 coordinates x RB rows per thread ----
#pragma unroll
        for (int g = 0; g < RB; g++) {
            float cf = corr[g];
#pragma unroll
            for (int k = 0; k < 8; k++) acc[g][k] *= cf;
        }
        for (int t = grp; t < nvalid; t += GROUPS) {
            const u32* row = vtile + t * VRS;
            int byte = chunk * VB;  // 8 fields = VB bytes
            u64 win = (u64)row[byte >> 2] | ((u64)row[(byte >> 2) + 1] << 32);
            u64 bitsv = win >> ((byte & 3) * 8);
            float x[8];
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] = vdecode((u32)(bitsv >> (k * VB)) & ((1u << VB) - 1), vtab);
#if VMODE != 0
            float bs = vscl[t * VSC + (chunk * 8) / 32];
#pragma unroll
            for (int k = 0; k < 8; k++) x[k] *= bs;
#endif
#pragma unroll
            for (int g = 0; g < RB; g++) {
                float p = sc[g * TILE + t];
#pragma unroll
                for (int k = 0; k < 8; k++) acc[g][k] += p * x[k];
            }
        }
        __syncthreads();
    }

    // ---- reduce the token groups, write the split's partial result ----
    if (tid < RB && row0 + tid < NR) {
        u64 o = (seq * NR + row0 + tid) * nsplit + split;
        pm[o] = mrun[tid];
        pl[o] = lrun[tid];
    }
    __syncthreads();
    float* redf = (float*)smem;  // GROUPS*RB*D floats (the host sizes shared memory for it)
#pragma unroll
    for (int g = 0; g < RB; g++)
#pragma unroll
        for (int k = 0; k < 8; k++) redf[(grp * RB + g) * D + chunk * 8 + k] = acc[g][k];
    __syncthreads();
    for (int i = tid; i < RB * D; i += NT) {
        int g = i / D, j = i % D;
        if (row0 + g >= NR) continue;
        float s = 0.0f;
        for (int r = 0; r < GROUPS; r++) s += redf[r * RB * D + i];
        u64 o = (seq * NR + row0 + g) * nsplit + split;
        po[o * D + j] = s;
    }
}

// Merge the splits of each (sequence-head, row), normalize, rotate back (V's
// rotation) and write out [B][NQ][Hq][D]. Block: CT threads; the split
// weights go to shared memory (dynamic: nsplit floats), then thread groups
// sum interleaved splits with many loads in flight.
#define CT 256
__device__ float block_reduce(float v, bool is_max, float* tmp) {
    for (int o = 16; o > 0; o >>= 1) {
        float x = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, x) : v + x;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) tmp[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = tmp[0];
    for (int w = 1; w < CT / 32; w++) r = is_max ? fmaxf(r, tmp[w]) : r + tmp[w];
    return r;
}

extern "C" __global__ void __launch_bounds__(CT) tq_combine(const float* __restrict__ po, const float* __restrict__ pm,
                                      const float* __restrict__ pl, int nsplit, const u32* __restrict__ vs1,
                                      const u32* __restrict__ vs2, float vtotal, int kv_heads, float* __restrict__ out) {
    extern __shared__ float wsplit[];  // nsplit
    __shared__ float tmp[CT / 32];
    __shared__ float part[CT];
    __shared__ float x[D];
    u64 bh = blockIdx.x;  // (sequence-head, row)
    int tid = threadIdx.x;
    float mx = NEG_INF;
    for (int s = tid; s < nsplit; s += CT) mx = fmaxf(mx, pm[bh * nsplit + s]);
    float M = block_reduce(mx, true, tmp);
    float lsum = 0.0f;
    for (int s = tid; s < nsplit; s += CT) {
        float m = pm[bh * nsplit + s];
        float w = m == NEG_INF ? 0.0f : __expf(m - M);
        wsplit[s] = w;
        lsum += w * pl[bh * nsplit + s];
    }
    float L = block_reduce(lsum, false, tmp);  // (its barriers also publish wsplit)
    int j = tid % D, grp = tid / D;
    const int NG = CT / D;
    float o = 0.0f;
#pragma unroll 8
    for (int s = grp; s < nsplit; s += NG) o += wsplit[s] * po[(bh * nsplit + s) * D + j];
    part[tid] = o;
    __syncthreads();
    if (tid < D) {
        float t = 0.0f;
        for (int g = 0; g < NG; g++) t += part[g * D + tid];
        x[tid] = t / L;
    }
    __syncthreads();
#if ROTV
    unrotate_smem(x, vs1, vs2, vtotal, D, 1);
#endif
    u64 sh = bh / NR;
    int row = (int)(bh % NR);
    u64 b = sh / kv_heads, h = sh % kv_heads;
    u64 orow = (b * NQ + row / G) * (kv_heads * G) + h * G + row % G;
    if (tid < D) out[orow * D + tid] = x[tid];
}

#if KMODE == 0 && VMODE == 0 && RB <= 16
// ---------------------------------------------------------------------------
// Tensor-core kernel for TurboQuant K and V (tq_attend_mma): MW warps per
// block, each an independent stream of 16-token steps over the block's split
// (warp w takes steps w, w + MW, ...), the warps' results merged in shared
// memory at the end.
//   Codes and norms of a step are brought into shared memory by the bulk copy
//   engine (cp.async.bulk, one lane issues four copies completing on the
//   step's mbarrier), STAGES steps ahead per warp: the loads never wait for
//   the arithmetic, and no thread holds codes in flight in registers.
//   S[row][t] = Q[row]·K̂[t]: mma m16n8k16, A = Q (up to 16 rows: query token x
//   head, zero past RB; fragments kept in registers), B = K̂ᵀ (8 tokens);
//   coordinates are permuted consistently in Q and K̂ so that thread
//   (n = lane/4, r = lane%4) supplies token n's coordinates [r·D/4, (r+1)·D/4),
//   one contiguous piece of the row.
//   K̂ and V̂ values come in f16 pairs from a table indexed by two packed fields
//   (one table when K and V share a codebook), replicated 32 times so that
//   lane l reads copy l: every lookup is free of bank conflicts.
//   Oᵀ[j][row] += V̂ᵀ[j][t] · P[row][t]: A = V̂ᵀ (16 coordinates × 16 tokens), B =
//   Pᵀ, which is exactly the C fragment of S (rows 8..15 a second MMA);
//   thread n holds coordinates [n·D/8, (n+1)·D/8) of its four tokens.
// f16 operands (Q, centroids, p·‖v‖), f32 accumulation.
// ---------------------------------------------------------------------------
#define CPT (D / 4)                        // K coordinates per thread
#define KWA ((CPT * KB + 31) / 32)         // aligned K words per thread
#define CPV (D / 8)                        // V coordinates per thread
#define VWA ((CPV * VB + 31) / 32)         // aligned V words per thread
#define RT (RB > 8 ? 2 : 1)                // 8-row halves of the MMA's 16 rows in use
#define MW (RT == 2 ? 8 : 16)               // warps per block (one block per SM)
#define STAGES 4                           // steps in flight per warp
#define WT 16                              // tokens per warp step
#define STG_K (WT * PK)
#define STG_V (WT * PV)
#define STG (STG_K + STG_V + WT * 8)       // bytes of one stage: codes, then K and V norms
#define NPK (1 << (2 * KB))
#define NPV (1 << (2 * VB))
#define TABSHARE (KVSAME && KB == VB)
// The K table starts on a 64 KiB boundary of the shared window (its address
// has zero bits 0..15): a lookup's address is then (offset | table address +
// lane offset), no add; stages fill the space before the tables and after
// them. 4-bit keys take 256 bytes per entry (32 copies of 4 bytes, then
// unused), so that one byte permute of the codes and of (table address +
// lane offset) is the whole address; not with 4-bit K and V of two codebooks
// (two such tables and the stages would not fit). The V table is K's, or
// follows it, on a 64 KiB boundary too when K's table is 64 KiB (VALIGN).
#define KSH ((KB == 4 && (TABSHARE || VB != 4)) ? 8 : 7)  // log2 bytes per K table entry
#define VSH (TABSHARE ? KSH : 7)                         // log2 bytes per V table entry
#define KTAB_BYTES (NPK << KSH)
#define VALIGN (TABSHARE || KTAB_BYTES % 65536 == 0)
#define TAB_BYTES (KTAB_BYTES + (TABSHARE ? 0 : NPV << VSH))
#define PIPE_BYTES (MW * STAGES * STG)
#define LAYOUT_BYTES (TAB_BYTES + (PIPE_BYTES + STG > 65536 ? PIPE_BYTES + STG : 65536))
#define MERGE_BYTES (MW * RB * (D + 2) * 4)
#define MMA_SMEM ((LAYOUT_BYTES > MERGE_BYTES ? LAYOUT_BYTES : MERGE_BYTES) + MW * STAGES * 8)
// the carve-up's size, for the host's build check (compile_all)
extern "C" __constant__ int tq_mma_smem_bytes = MMA_SMEM;

__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("{ .reg .f16 l, h;\n cvt.rn.f16.f32 l, %1;\n cvt.rn.f16.f32 h, %2;\n mov.b32 %0, {l, h}; }" : "=r"(r) : "f"(lo), "f"(hi));
    return r;
}

__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    asm volatile("{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}"
                 ::"r"(smem_u32(bar)), "r"(parity) : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory, completing on `bar`
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, u32 bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}

// `NBITS` bits starting at bit `bit` of a token row (u32 words in shared
// memory), aligned into NA words: out[i] = bits [bit + 32i, bit + 32i + 32).
// ALIGN: bytes of alignment of the piece known at compile time (16/8/4:
// vector loads, no shifting; otherwise a funnel-shifted window).
template <int NA, int NBITS, int ALIGN>
__device__ __forceinline__ void load_window(const u32* row, int bit, u32* out) {
    if (ALIGN == 16 && NA == 4) {
        uint4 v = *(const uint4*)(row + (bit >> 5));
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
    } else if (ALIGN >= 8 && NA == 2) {
        uint2 v = *(const uint2*)(row + (bit >> 5));
        out[0] = v.x; out[1] = v.y;
    } else if (ALIGN >= 4 && NBITS % 32 == 0) {
#pragma unroll
        for (int i = 0; i < NA; i++) out[i] = row[(bit >> 5) + i];
    } else {
        int w0 = bit >> 5, sh = bit & 31;
        int need = (sh + NBITS + 31) >> 5;
        u32 w[NA + 1];
#pragma unroll
        for (int i = 0; i < NA + 1; i++) w[i] = i < need ? row[w0 + i] : 0u;
#pragma unroll
        for (int i = 0; i < NA; i++) out[i] = __funnelshift_r(w[i], w[i + 1], sh);
    }
}

// largest of 16/8/4/1 dividing both the piece's byte size and the row size
#define ALIGN_OF(piece_bits, row_bytes) \
    (((piece_bits) % 128 == 0 && (row_bytes) % 16 == 0) ? 16 : \
     ((piece_bits) % 64 == 0 && (row_bytes) % 8 == 0) ? 8 : \
     ((piece_bits) % 32 == 0 && (row_bytes) % 4 == 0) ? 4 : 1)

// field of `bits` bits at compile-time position `pos` of aligned words
template <int BITS>
__device__ __forceinline__ u32 field(const u32* a, int pos) {
    int wi = pos >> 5, sh = pos & 31;
    u32 v = a[wi] >> sh;
    if (sh + BITS > 32) v |= a[wi + 1] << (32 - sh);
    return v & ((1u << BITS) - 1);
}

__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

// Pair-table entry for the field of BITS bits at `pos` (compile time) of
// aligned words: the table (at shared address `tab`, `tabl` = tab + lane·4)
// holds 32 copies of each entry side by side, copy l at byte 4l of the entry,
// so lane l's offset is field << S | lane << 2 (2^S bytes per entry). On a
// 64 KiB boundary (ALIGNED) the address is offset | tabl: byte-wide fields
// with S = 8 take one byte permute ([tabl byte 0, field, tabl bytes 2, 3]),
// others a shift and one logic op; otherwise the base is added.
template <int BITS, int S, bool ALIGNED>
__device__ __forceinline__ u32 lut(u32 tab, u32 tabl, const u32* a, int pos, u32 lane4) {
    int wi = pos >> 5, sh = pos & 31;
    if (BITS == 8 && S == 8 && ALIGNED && sh % 8 == 0) return lds32(__byte_perm(a[wi], tabl, 0x7604u | ((u32)(sh >> 3) << 4)));
    u32 off;
    if (BITS == 8 && S == 8 && sh % 8 == 0) {
        off = __byte_perm(a[wi], lane4, 0x5504u | ((u32)(sh >> 3) << 4));  // [lane4, byte, 0, 0]
    } else {
        const u32 mask = ((1u << BITS) - 1) << S;
        if (sh + BITS > 32) off = field<BITS>(a, pos) << S;
        else if (sh >= S) off = (a[wi] >> (sh - S)) & mask;
        else off = (a[wi] << (S - sh)) & mask;
        if (ALIGNED) return lds32(off | tabl);
        off |= lane4;
    }
    return lds32(tab + off);
}

extern "C" __global__ void __launch_bounds__(MW * 32, 1) tq_attend_mma(
    const float* __restrict__ q, const u8* __restrict__ kc, const float* __restrict__ ks,
    const u8* __restrict__ vc, const float* __restrict__ vs, const int* __restrict__ lens, int cap, int kv_heads,
    int split_len, const u32* __restrict__ ks1, const u32* __restrict__ ks2, float ktotal,
    const float* __restrict__ ktab_g, const float* __restrict__ vtab_g, float* __restrict__ po,
    float* __restrict__ pm, float* __restrict__ pl) {
    extern __shared__ __align__(128) unsigned char dsm[];
    // layout: stages [0, hole), tables [hole, hole + TAB_BYTES), stages after
    const u32 dsm_s = smem_u32(dsm);
    const u32 hole = (0x10000u - (dsm_s & 0xFFFFu)) & 0xFFFFu;
    const int before = min((int)(hole / STG), MW * STAGES);  // stages before the tables
    u32* ktab = (u32*)(dsm + hole);
    u32* vtab = TABSHARE ? ktab : (u32*)(dsm + hole + KTAB_BYTES);
    const u32 ktab_s = dsm_s + hole, vtab_s = ktab_s + (TABSHARE ? 0 : KTAB_BYTES);
    const u32 lane_off = (threadIdx.x & 31) << 2;
    const u32 ktabl = ktab_s + lane_off, vtabl = vtab_s + lane_off;
    auto stage = [&](int i) { return dsm + (i < before ? i * STG : hole + TAB_BYTES + (i - before) * STG); };
    u64* bars = (u64*)(dsm + MMA_SMEM - MW * STAGES * 8);

    int split = blockIdx.x, h = blockIdx.y / NGR, row0 = (blockIdx.y % NGR) * RB, b = blockIdx.z;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int n = lane >> 2, r = lane & 3;
    const u32 lane4 = (u32)lane << 2;
    int len = min(lens[b], cap);  // never a slot past the planes
    int t_begin = split * split_len;
    int t_end = min(len, t_begin + split_len);
    int nsplit = gridDim.x;
    u64 seq = (u64)b * kv_heads + h;
    const u8* kcs = kc + seq * cap * PK;
    const u8* vcs = vc + seq * cap * PV;
    const float* kns = ks + seq * cap;
    const float* vns = vs + seq * cap;

    for (int i = tid; i < NPK * 32; i += blockDim.x) {
        int e = i >> 5;
        ktab[(e << (KSH - 2)) + (i & 31)] = pack_h2(ktab_g[e & ((1 << KB) - 1)], ktab_g[e >> KB]);
    }
    if (!TABSHARE)
        for (int i = tid; i < NPV * 32; i += blockDim.x) {
            int e = i >> 5;
            vtab[(e << (VSH - 2)) + (i & 31)] = pack_h2(vtab_g[e & ((1 << VB) - 1)], vtab_g[e >> VB]);
        }
    if (tid == 0) {
        for (int i = 0; i < MW * STAGES; i++) mbar_init(bars + i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    // this warp's steps: t0 = first + k * WT * MW, k < nsteps
    u64* wb = bars + warp * STAGES;
    int first = t_begin + WT * warp;
    int nsteps = first < t_end ? (t_end - first + WT * MW - 1) / (WT * MW) : 0;
    auto issue = [&](int k) {
        int t0 = first + k * WT * MW;
        int sl = k % STAGES;
        unsigned char* dst = stage(warp * STAGES + sl);
        mbar_expect_tx(wb + sl, STG);
        bulk_g2s(dst, kcs + (u64)t0 * PK, STG_K, wb + sl);
        bulk_g2s(dst + STG_K, vcs + (u64)t0 * PV, STG_V, wb + sl);
        bulk_g2s(dst + STG_K + STG_V, kns + t0, WT * 4, wb + sl);
        bulk_g2s(dst + STG_K + STG_V + WT * 4, vns + t0, WT * 4, wb + sl);
    };
    if (lane == 0)
        for (int k = 0; k < STAGES && k < nsteps; k++) issue(k);

    // A fragments of Q (rotated and scaled by tq_prep_q) in registers: step s,
    // thread (n, r): rows n (and n + 8), coordinates r*CPT + 4s + {0,1} and {2,3}
    u32 qa[D / 16][2], qb[D / 16][2];
#pragma unroll
    for (int s = 0; s < D / 16; s++) {
        int c0 = r * CPT + 4 * s;
        qa[s][0] = qa[s][1] = qb[s][0] = qb[s][1] = 0u;
        if (n < RB && row0 + n < NR) {
            float4 x = __ldg((const float4*)(q + (seq * NR + row0 + n) * D + c0));
            qa[s][0] = pack_h2(x.x, x.y);
            qa[s][1] = pack_h2(x.z, x.w);
        }
        if (RT == 2 && n + 8 < RB && row0 + n + 8 < NR) {
            float4 x = __ldg((const float4*)(q + (seq * NR + row0 + n + 8) * D + c0));
            qb[s][0] = pack_h2(x.x, x.y);
            qb[s][1] = pack_h2(x.z, x.w);
        }
    }
    // tokens [0, lim) are seen by this thread's score rows n and n + 8
    int lim[2] = {row_limit(row0 + n, len, t_end), row_limit(row0 + n + 8, len, t_end)};
    int lim_min = min(lim[0], RT == 2 ? lim[1] : lim[0]);

    float o[RT][D / 16][4];
#pragma unroll
    for (int rt = 0; rt < RT; rt++)
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++)
#pragma unroll
            for (int i = 0; i < 4; i++) o[rt][mb][i] = 0.0f;
    float m[RT], l[RT];  // rows rt*8 + n (the same in the 4 lanes of a group)
#pragma unroll
    for (int rt = 0; rt < RT; rt++) { m[rt] = NEG_INF; l[rt] = 0.0f; }

    for (int k = 0; k < nsteps; k++) {
        int sl = k % STAGES;
        int t0 = first + k * WT * MW;
        mbar_wait(wb + sl, (k / STAGES) & 1);
        const unsigned char* sp = stage(warp * STAGES + sl);
        const u32* kcw = (const u32*)sp;
        const u32* vcw = (const u32*)(sp + STG_K);
        const float* knw = (const float*)(sp + STG_K + STG_V);
        const float* vnw = knw + WT;

        u32 kw[2][KWA];
#pragma unroll
        for (int j = 0; j < 2; j++) load_window<KWA, CPT * KB, ALIGN_OF(CPT * KB, PK)>(kcw + (8 * j + n) * (PK / 4), r * CPT * KB, kw[j]);
        const int tl[4] = {2 * r, 2 * r + 1, 2 * r + 8, 2 * r + 9};
        u32 vw[4][VWA];
#pragma unroll
        for (int i = 0; i < 4; i++) load_window<VWA, CPV * VB, ALIGN_OF(CPV * VB, PV)>(vcw + tl[i] * (PV / 4), n * CPV * VB, vw[i]);
        float2 kn0 = *(const float2*)(knw + 2 * r), kn1 = *(const float2*)(knw + 8 + 2 * r);
        float2 vn0 = *(const float2*)(vnw + 2 * r), vn1 = *(const float2*)(vnw + 8 + 2 * r);

        // ---- scores: two blocks of 8 tokens, two independent MMA chains each ----
        float sc[2][4], sc2[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) { sc[j][i] = 0.0f; sc2[j][i] = 0.0f; }
#pragma unroll
            for (int s = 0; s < D / 16; s++) {
                u32 b0 = lut<2 * KB, KSH, true>(ktab_s, ktabl, kw[j], (2 * s) * 2 * KB, lane4);
                u32 b1 = lut<2 * KB, KSH, true>(ktab_s, ktabl, kw[j], (2 * s + 1) * 2 * KB, lane4);
                mma16816(s % 2 ? sc2[j] : sc[j], qa[s][0], RT == 2 ? qb[s][0] : 0u, qa[s][1], RT == 2 ? qb[s][1] : 0u, b0, b1);
            }
#pragma unroll
            for (int i = 0; i < 4; i++) sc[j][i] += sc2[j][i];
        }
        // sc[j][0..1]: row n, tokens t0 + 8j + 2r + {0,1}; sc[j][2..3]: row n + 8
        int tv[4] = {t0 + 2 * r, t0 + 2 * r + 1, t0 + 2 * r + 8, t0 + 2 * r + 9};
        bool full = t0 + WT <= lim_min;  // no token of the step is masked for these rows
        float knv[4] = {kn0.x, kn0.y, kn1.x, kn1.y};
        float vnv[4] = {vn0.x, vn0.y, vn1.x, vn1.y};
        u32 pb[RT][2];
#pragma unroll
        for (int rt = 0; rt < RT; rt++) {
            float x[4] = {sc[0][2 * rt] * knv[0], sc[0][2 * rt + 1] * knv[1], sc[1][2 * rt] * knv[2], sc[1][2 * rt + 1] * knv[3]};
            if (!full) {
#pragma unroll
                for (int i = 0; i < 4; i++) if (tv[i] >= lim[rt]) x[i] = NEG_INF;
            }
            float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float mnew = fmaxf(m[rt], mx);
            float msafe = mnew == NEG_INF ? 0.0f : mnew;  // a row that has seen no token yet
            float cf = __expf(m[rt] - msafe);
            m[rt] = mnew;
            float p[4];
#pragma unroll
            for (int i = 0; i < 4; i++) p[i] = __expf(x[i] - msafe);
            l[rt] = l[rt] * cf + (p[0] + p[1]) + (p[2] + p[3]);
            // rescale O: this thread's O columns are rows rt*8 + 2r, rt*8 + 2r + 1
            float cfa = __shfl_sync(0xffffffffu, cf, 8 * r);
            float cfb = __shfl_sync(0xffffffffu, cf, 8 * r + 4);
            if (__any_sync(0xffffffffu, cfa != 1.0f || cfb != 1.0f)) {  // the max rarely moves
#pragma unroll
                for (int mb = 0; mb < D / 16; mb++) {
                    o[rt][mb][0] *= cfa; o[rt][mb][1] *= cfb; o[rt][mb][2] *= cfa; o[rt][mb][3] *= cfb;
                }
            }
            pb[rt][0] = pack_h2(p[0] * vnv[0], p[1] * vnv[1]);
            pb[rt][1] = pack_h2(p[2] * vnv[2], p[3] * vnv[3]);
        }
        // ---- values: A = V̂ᵀ rows (coordinates n*CPV + 2mb + {0 | 1}), columns tokens ----
#if VB == 4
        // pair bytes four at a time: lo = coordinates 2i (token t | token t' << 4), hi = 2i+1
        u32 plo[2][VWA], phi[2][VWA];
#pragma unroll
        for (int pr = 0; pr < 2; pr++)
#pragma unroll
            for (int w = 0; w < VWA; w++) {
                u32 X = vw[2 * pr][w], Y = vw[2 * pr + 1][w];
                plo[pr][w] = (X & 0x0F0F0F0Fu) | ((Y << 4) & 0xF0F0F0F0u);
                phi[pr][w] = ((X >> 4) & 0x0F0F0F0Fu) | (Y & 0xF0F0F0F0u);
            }
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++) {
            int w = mb >> 2, pos = (mb & 3) * 8 + 32 * w;
            u32 a0 = lut<8, VSH, VALIGN>(vtab_s, vtabl, plo[0], pos, lane4), a1 = lut<8, VSH, VALIGN>(vtab_s, vtabl, phi[0], pos, lane4);
            u32 a2 = lut<8, VSH, VALIGN>(vtab_s, vtabl, plo[1], pos, lane4), a3 = lut<8, VSH, VALIGN>(vtab_s, vtabl, phi[1], pos, lane4);
#pragma unroll
            for (int rt = 0; rt < RT; rt++) mma16816(o[rt][mb], a0, a1, a2, a3, pb[rt][0], pb[rt][1]);
        }
#else
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++) {
            u32 a[4];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int pos = (2 * mb + e) * VB;
                u32 i0 = (field<VB>(vw[0], pos) | (field<VB>(vw[1], pos) << VB)) << VSH;
                u32 i1 = (field<VB>(vw[2], pos) | (field<VB>(vw[3], pos) << VB)) << VSH;
                a[e] = lds32(VALIGN ? i0 | vtabl : vtab_s + (i0 | lane4));
                a[2 + e] = lds32(VALIGN ? i1 | vtabl : vtab_s + (i1 | lane4));
            }
#pragma unroll
            for (int rt = 0; rt < RT; rt++) mma16816(o[rt][mb], a[0], a[1], a[2], a[3], pb[rt][0], pb[rt][1]);
        }
#endif
        __syncwarp();  // every lane is done with this stage
        // every read of the stage has completed (its values were consumed
        // above), so the copy engine may overwrite it
        if (lane == 0 && k + STAGES < nsteps) issue(k + STAGES);
    }

    // ---- merge the warps of the block (the merge area reuses tables and stages) ----
    __syncthreads();
    float* wm = (float*)dsm;                 // [MW][RB]
    float* wl = wm + MW * RB;                // [MW][RB]
    float* wo = wl + MW * RB;                // [MW][RB][D]
#pragma unroll
    for (int rt = 0; rt < RT; rt++) {
        float lt = l[rt];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        int row = rt * 8 + n;
        if (r == 0 && row < RB) { wm[warp * RB + row] = m[rt]; wl[warp * RB + row] = lt; }
        // O fragment: c0,c1: coordinate n*CPV + 2mb, rows rt*8 + 2r, + 1; c2,c3: coordinate + 1
        int ra = rt * 8 + 2 * r, rb = ra + 1;
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++) {
            int c = n * CPV + 2 * mb;
            if (ra < RB) { wo[(warp * RB + ra) * D + c] = o[rt][mb][0]; wo[(warp * RB + ra) * D + c + 1] = o[rt][mb][2]; }
            if (rb < RB) { wo[(warp * RB + rb) * D + c] = o[rt][mb][1]; wo[(warp * RB + rb) * D + c + 1] = o[rt][mb][3]; }
        }
    }
    __syncthreads();
    for (int i = tid; i < RB * D; i += blockDim.x) {
        int g = i / D, j = i % D;
        if (row0 + g >= NR) continue;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < MW; w++) M = fmaxf(M, wm[w * RB + g]);
        float L = 0.0f, O = 0.0f;
        if (M != NEG_INF) {
#pragma unroll
            for (int w = 0; w < MW; w++) {
                float mw = wm[w * RB + g];
                if (mw == NEG_INF) continue;
                float f = __expf(mw - M);
                L += f * wl[w * RB + g];
                O += f * wo[(w * RB + g) * D + j];
            }
        }
        u64 oi = (seq * NR + row0 + g) * nsplit + split;
        po[oi * D + j] = O;
        if (j == 0) { pm[oi] = M; pl[oi] = L; }
    }
}
#endif
#endif

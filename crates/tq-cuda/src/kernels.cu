// turboquant CUDA kernels, compiled at run time by NVRTC (see src/gpu.rs).
//
// The host prepends a configuration block of #defines:
//   D      head dimension (64 or 128)
//   G      query heads per KV head (GQA group)
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
extern "C" __global__ void tq_encode(const float* __restrict__ xs, int n, const u32* __restrict__ s1,
                                     const u32* __restrict__ s2, float total, const float* __restrict__ boundaries,
                                     const float* __restrict__ centroids, int bits, int nc,
                                     u8* __restrict__ codes, float* __restrict__ scales) {
    __shared__ float y[D];
    __shared__ float lanes[8];
    __shared__ float s_norm;
    __shared__ int s_mode;  // 0: normal path, 1: zero vector
    __shared__ u8 idx[D];
    int v = blockIdx.x;
    if (v >= n) return;
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
        scales[v] = scale;
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
        codes[(u64)v * nbytes + j] = (u8)byte;
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
// Fused decode attention (flash-decoding). Grid: (splits, kv_heads, batch).
// Block: NT threads; each split walks its tokens in tiles of TILE.
//   1. the G query heads of this KV head are rotated (K's rotation) and scaled
//      by 1/sqrt(D) in shared memory;
//   2. per tile: codes are copied to shared memory (rows padded to an odd
//      number of words: conflict-free), thread t scores token t for all G
//      heads straight from the codes, a warp per head updates the running
//      max / sum (online softmax), and values are accumulated from their codes
//      in V's rotated domain (8 coordinates per thread, tokens spread over
//      NT/(D/8) thread groups); the next tile's codes are loaded into
//      registers while this one is computed;
//   3. the unnormalized partial output, max and sum of the split are written;
//      `combine` merges the splits and rotates back once.
// Cache planes per side: codes [B][H][cap][P] bytes; scales: TurboQuant
// [B][H][cap] f32, ggml [B][H][cap][D/32] f16.
// ---------------------------------------------------------------------------
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

// Rotate (K's rotation) and scale (1/sqrt(D)) the queries once per step:
// grid B*kv_heads, block NT; q and qr are [B][Hq][D].
extern "C" __global__ void __launch_bounds__(NT) tq_prep_q(const float* __restrict__ q, const u32* __restrict__ ks1,
                                                         const u32* __restrict__ ks2, float ktotal,
                                                         float* __restrict__ qr) {
    __shared__ float x[G * D];
    u64 base = (u64)blockIdx.x * G * D;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) x[i] = q[base + i];
    __syncthreads();
#if ROTK
    rotate_smem(x, ks1, ks2, ktotal, D, G);
#endif
    float sc = rsqrtf((float)D);
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) qr[base + i] = x[i] * sc;
}

extern "C" __global__ void __launch_bounds__(NT) tq_attend(
    const float* __restrict__ q,        // [B][Hq][D]
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
    float* sc = vscl + TILE * VSC;                       // G*TILE scores, then weights
    float* qr = sc + G * TILE;                           // G*D
    float* ktab = qr + G * D;                            // 256
    float* vtab = ktab + 256;                            // 256
    float* corr = vtab + 256;                            // G
    float* mrun = corr + G;                              // G
    float* lrun = mrun + G;                              // G

    int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int len = lens[b];
    int t_begin = split * split_len;
    int t_end = min(len, t_begin + split_len);
    int hq0 = h * G;
    int nsplit = gridDim.x;
    int Hq = kv_heads * G;

    u64 seq = (u64)b * kv_heads + h;
    const u8* kcs = kc + seq * cap * PK;
    const u8* vcs = vc + seq * cap * PV;

    for (int i = tid; i < 256; i += NT) {
        ktab[i] = KMODE == 0 && i < (1 << KB) ? ktab_g[i] : 0.0f;
        vtab[i] = VMODE == 0 && i < (1 << VB) ? vtab_g[i] : 0.0f;
    }
    for (int i = tid; i < G * D; i += NT) qr[i] = q[((u64)b * Hq + hq0) * D + i];  // rotated and scaled (tq_prep_q)
    if (tid < G) { mrun[tid] = NEG_INF; lrun[tid] = 0.0f; }
    __syncthreads();

    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++)
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
            float s[G];
#pragma unroll
            for (int g = 0; g < G; g++) s[g] = 0.0f;
            const u32* row = ktile + tid * KRS;
#pragma unroll
            for (int c = 0; c < NBLK; c++) {  // 32 coordinates = KB words
                u32 w[KB + 1];
#pragma unroll
                for (int i = 0; i < KB; i++) w[i] = row[c * KB + i];
                w[KB] = 0;
                float part[G];
#pragma unroll
                for (int g = 0; g < G; g++) part[g] = 0.0f;
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
                    for (int g = 0; g < G; g++) {
                        float4 qq = ((const float4*)(qr + g * D))[(c * 32 + k) / 4];
                        part[g] += qq.x * x[0] + qq.y * x[1] + qq.z * x[2] + qq.w * x[3];
                    }
                }
#pragma unroll
                for (int g = 0; g < G; g++) s[g] += KMODE == 0 ? part[g] : part[g] * kscale[c];
            }
#pragma unroll
            for (int g = 0; g < G; g++) sc[g * TILE + tid] = KMODE == 0 ? s[g] * kscale[0] : s[g];
        } else {
#pragma unroll
            for (int g = 0; g < G; g++) sc[g * TILE + tid] = NEG_INF;
        }
        __syncthreads();

        // ---- online softmax: a warp per head ----
        for (int g = warp; g < G; g += NT / 32) {
            float v[TILE / 32];
            float mx = NEG_INF;
#pragma unroll
            for (int i = 0; i < TILE / 32; i++) { v[i] = sc[g * TILE + lane + 32 * i]; mx = fmaxf(mx, v[i]); }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float mold = mrun[g];
            float mnew = fmaxf(mold, mx);
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < TILE / 32; i++) {
                int t = lane + 32 * i;
                float p = __expf(v[i] - mnew);
                sum += p;
                sc[g * TILE + t] = VMODE == 0 ? p * vscl[t] : p;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            __syncwarp();
            if (lane == 0) {
                float cf = __expf(mold - mnew);
                corr[g] = cf;
                mrun[g] = mnew;
                lrun[g] = lrun[g] * cf + sum;
            }
        }
        __syncthreads();

        // ---- values: 8 coordinates x G heads per thread ----
#pragma unroll
        for (int g = 0; g < G; g++) {
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
            for (int g = 0; g < G; g++) {
                float p = sc[g * TILE + t];
#pragma unroll
                for (int k = 0; k < 8; k++) acc[g][k] += p * x[k];
            }
        }
        __syncthreads();
    }

    // ---- reduce the token groups, write the split's partial result ----
    int Hq_ = Hq;
    if (tid < G) {
        u64 o = (((u64)b * Hq_ + hq0 + tid) * nsplit + split);
        pm[o] = mrun[tid];
        pl[o] = lrun[tid];
    }
    __syncthreads();
    float* redf = (float*)smem;  // GROUPS*G*D floats (the host sizes shared memory for it)
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int k = 0; k < 8; k++) redf[(grp * G + g) * D + chunk * 8 + k] = acc[g][k];
    __syncthreads();
    for (int i = tid; i < G * D; i += NT) {
        float s = 0.0f;
        for (int r = 0; r < GROUPS; r++) s += redf[r * G * D + i];
        int g = i / D, j = i % D;
        u64 o = (((u64)b * Hq + hq0 + g) * nsplit + split);
        po[o * D + j] = s;
    }
}

// Merge the splits of each (sequence, query head), normalize, rotate back
// (V's rotation) and write out [B][Hq][D]. Block: CT threads; the split
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
                                      const u32* __restrict__ vs2, float vtotal, float* __restrict__ out) {
    extern __shared__ float wsplit[];  // nsplit
    __shared__ float tmp[CT / 32];
    __shared__ float part[CT];
    __shared__ float x[D];
    u64 bh = blockIdx.x;
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
    if (tid < D) out[bh * D + tid] = x[tid];
}

#if KMODE == 0 && VMODE == 0 && G <= 8
// ---------------------------------------------------------------------------
// Tensor-core variant for TurboQuant K and V (G <= 8), one warp per stream of
// 16-token steps, 4 warps per block (their results merged in shared memory).
//   S[g][t] = Q[g]·K̂[t]:  mma m16n8k16, A = Q (rows g, zero past G), B = K̂ᵀ
//   (8 tokens); coordinates are permuted consistently in Q and K̂ so that
//   thread (n = lane/4, r = lane%4) supplies token n's coordinates
//   [r·D/4, (r+1)·D/4), which it loads as one contiguous piece of the row.
//   K̂ values come in pairs from a table indexed by two packed fields.
//   Oᵀ[j][g] += V̂ᵀ[j][t] · P[g][t]: A = V̂ᵀ (16 coordinates × 16 tokens), B =
//   Pᵀ, which is exactly the C fragment of S (no shuffles, no shared memory);
//   thread n holds coordinates [n·D/8, (n+1)·D/8) of its four tokens.
// f16 operands (Q, centroids, p·‖v‖), f32 accumulation.
// ---------------------------------------------------------------------------
#define CPT (D / 4)                        // K coordinates per thread
#define KWA ((CPT * KB + 31) / 32)         // aligned K words per thread
#define CPV (D / 8)                        // V coordinates per thread
#define VWA ((CPV * VB + 31) / 32)         // aligned V words per thread
#define NWARP 4
#define TREP 16
#define TAB_WORDS (((1 << (2 * KB)) + (1 << (2 * VB))) * TREP)
#define WO_WORDS (NWARP * 8 * D)
#define SMEM_TABS (TAB_WORDS > WO_WORDS ? TAB_WORDS : WO_WORDS)

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

// `NBITS` bits starting at bit `bit` of a token row (u32 words), aligned into
// NA words: out[i] = bits [bit + 32i, bit + 32i + 32). ALIGN: bytes of
// alignment of the piece known at compile time (16/8/4: vector loads, no
// shifting; otherwise a funnel-shifted window).
template <int NA, int NBITS, int ALIGN>
__device__ __forceinline__ void load_window(const u32* row, int bit, u32* out) {
    if (ALIGN == 16 && NA == 4) {
        uint4 v = __ldg((const uint4*)(row + (bit >> 5)));
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
    } else if (ALIGN >= 8 && NA == 2) {
        uint2 v = __ldg((const uint2*)(row + (bit >> 5)));
        out[0] = v.x; out[1] = v.y;
    } else if (ALIGN >= 4 && NBITS % 32 == 0) {
#pragma unroll
        for (int i = 0; i < NA; i++) out[i] = __ldg(row + (bit >> 5) + i);
    } else {
        int w0 = bit >> 5, sh = bit & 31;
        int need = (sh + NBITS + 31) >> 5;
        u32 w[NA + 1];
#pragma unroll
        for (int i = 0; i < NA + 1; i++) w[i] = i < need ? __ldg(row + w0 + i) : 0u;
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

extern "C" __global__ void __launch_bounds__(NWARP * 32, 4) tq_attend_mma(
    const float* __restrict__ q, const u8* __restrict__ kc, const float* __restrict__ ks,
    const u8* __restrict__ vc, const float* __restrict__ vs, const int* __restrict__ lens, int cap, int kv_heads,
    int split_len, const u32* __restrict__ ks1, const u32* __restrict__ ks2, float ktotal,
    const float* __restrict__ ktab_g, const float* __restrict__ vtab_g, float* __restrict__ po,
    float* __restrict__ pm, float* __restrict__ pl) {
    __shared__ uint2 qfrag[(D / 16) * 32];
    __shared__ float wm[NWARP][8], wl[NWARP][8];
    // pair tables replicated TREP times (lane l reads copy l % TREP: at most
    // 32/TREP lanes per bank), reused for the warps' partial outputs after the loop
    __shared__ __align__(16) u32 tabs[SMEM_TABS];
    u32* ktab2 = tabs;
    u32* vtab2 = tabs + (1 << (2 * KB)) * TREP;
    float (*wo)[8][D] = (float (*)[8][D])tabs;
    const int rep = (threadIdx.x & 31) & (TREP - 1);

    int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int n = lane >> 2, r = lane & 3;
    int len = lens[b];
    int t_begin = split * split_len;
    int t_end = min(len, t_begin + split_len);
    int hq0 = h * G, Hq = kv_heads * G, nsplit = gridDim.x;
    u64 seq = (u64)b * kv_heads + h;
    const u32* kcs = (const u32*)(kc + seq * cap * PK);
    const u32* vcs = (const u32*)(vc + seq * cap * PV);
    const float* kns = ks + seq * cap;
    const float* vns = vs + seq * cap;

    for (int i = tid; i < (1 << (2 * KB)) * TREP; i += blockDim.x) {
        int e = i / TREP;
        ktab2[i] = pack_h2(ktab_g[e & ((1 << KB) - 1)], ktab_g[e >> KB]);
    }
    for (int i = tid; i < (1 << (2 * VB)) * TREP; i += blockDim.x) {
        int e = i / TREP;
        vtab2[i] = pack_h2(vtab_g[e & ((1 << VB) - 1)], vtab_g[e >> VB]);
    }
    __syncthreads();
    // A fragments of Q (rotated and scaled by tq_prep_q) in shared memory
    // (registers are the scarce resource): step s, thread (n, r): row n,
    // coordinates r*CPT + 4s + {0,1} and {2,3}
    for (int i = tid; i < (D / 16) * 32; i += blockDim.x) {
        int s = i / 32, ln = i % 32, nn = ln >> 2, rr = ln & 3;
        int c0 = rr * CPT + 4 * s;
        uint2 v = make_uint2(0u, 0u);
        if (nn < G) {
            float4 qq = __ldg((const float4*)(q + ((u64)b * Hq + hq0 + nn) * D + c0));
            v = make_uint2(pack_h2(qq.x, qq.y), pack_h2(qq.z, qq.w));
        }
        qfrag[i] = v;
    }
    __syncthreads();

    float o[D / 16][4];
#pragma unroll
    for (int mb = 0; mb < D / 16; mb++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[mb][i] = 0.0f;
    float m = NEG_INF, l = 0.0f;  // head n (same in the 4 lanes of a group)

    // token steps of 16, interleaved over the warps; the next step's codes and
    // norms are loaded into registers while this one is computed
    struct Buf {
        u32 kw[2][KWA];
        u32 vw[4][VWA];
        float2 kn0, kn1, vn0, vn1;
    };
    auto load = [&](Buf& x, int t0) {
#pragma unroll
        for (int j = 0; j < 2; j++)
            load_window<KWA, CPT * KB, ALIGN_OF(CPT * KB, PK)>(kcs + (u64)(t0 + 8 * j + n) * (PK / 4), r * CPT * KB, x.kw[j]);
        int tl[4] = {t0 + 2 * r, t0 + 2 * r + 1, t0 + 2 * r + 8, t0 + 2 * r + 9};
#pragma unroll
        for (int i = 0; i < 4; i++) load_window<VWA, CPV * VB, ALIGN_OF(CPV * VB, PV)>(vcs + (u64)tl[i] * (PV / 4), n * CPV * VB, x.vw[i]);
        x.kn0 = __ldg((const float2*)(kns + t0 + 2 * r));
        x.kn1 = __ldg((const float2*)(kns + t0 + 8 + 2 * r));
        x.vn0 = __ldg((const float2*)(vns + t0 + 2 * r));
        x.vn1 = __ldg((const float2*)(vns + t0 + 8 + 2 * r));
    };
    Buf cur, nxt;
    int tstart = t_begin + 16 * warp;
    if (tstart < t_end) load(cur, tstart);
    for (int t0 = tstart; t0 < t_end; t0 += 16 * NWARP) {
        if (t0 + 16 * NWARP < t_end) load(nxt, t0 + 16 * NWARP);
        int tv[4] = {t0 + 2 * r, t0 + 2 * r + 1, t0 + 2 * r + 8, t0 + 2 * r + 9};
        const u32 (*kw)[KWA] = cur.kw;
        const u32 (*vw)[VWA] = cur.vw;
        float2 kn0 = cur.kn0, kn1 = cur.kn1, vn0 = cur.vn0, vn1 = cur.vn1;

        // ---- scores: two blocks of 8 tokens ----
        float sc[2][4];
        float sc2[2][4];  // second accumulator: two independent MMA chains per block
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int i = 0; i < 4; i++) { sc[j][i] = 0.0f; sc2[j][i] = 0.0f; }
#pragma unroll
            for (int s = 0; s < D / 16; s++) {
                u32 b0 = ktab2[field<2 * KB>(kw[j], (2 * s) * 2 * KB) * TREP + rep];
                u32 b1 = ktab2[field<2 * KB>(kw[j], (2 * s + 1) * 2 * KB) * TREP + rep];
                uint2 qa = qfrag[s * 32 + lane];
                mma16816(s % 2 ? sc2[j] : sc[j], qa.x, 0u, qa.y, 0u, b0, b1);
            }
#pragma unroll
            for (int i = 0; i < 4; i++) sc[j][i] += sc2[j][i];
        }
        // sc[j][0..1]: head n, tokens t0 + 8j + 2r + {0,1}
        float x[4] = {sc[0][0] * kn0.x, sc[0][1] * kn0.y, sc[1][0] * kn1.x, sc[1][1] * kn1.y};
#pragma unroll
        for (int i = 0; i < 4; i++) if (tv[i] >= t_end) x[i] = NEG_INF;
        float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float mnew = fmaxf(m, mx);
        float cf = __expf(m - mnew);
        m = mnew;
        float p[4];
#pragma unroll
        for (int i = 0; i < 4; i++) p[i] = tv[i] < t_end ? __expf(x[i] - mnew) : 0.0f;
        l = l * cf + (p[0] + p[1]) + (p[2] + p[3]);
        // rescale O: this thread's O columns are heads 2r, 2r+1
        float cfa = __shfl_sync(0xffffffffu, cf, 8 * r);
        float cfb = __shfl_sync(0xffffffffu, cf, 8 * r + 4);
        if (__any_sync(0xffffffffu, cfa != 1.0f || cfb != 1.0f)) {  // the max rarely moves
#pragma unroll
            for (int mb = 0; mb < D / 16; mb++) {
                o[mb][0] *= cfa; o[mb][1] *= cfb; o[mb][2] *= cfa; o[mb][3] *= cfb;
            }
        }
        float vnv[4] = {vn0.x, vn0.y, vn1.x, vn1.y};
        float pw[4];
#pragma unroll
        for (int i = 0; i < 4; i++) pw[i] = tv[i] < t_end ? p[i] * vnv[i] : 0.0f;
        u32 pb0 = pack_h2(pw[0], pw[1]), pb1 = pack_h2(pw[2], pw[3]);
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
            int w = mb >> 2, sh = (mb & 3) * 8;
            u32 a0 = vtab2[((plo[0][w] >> sh) & 255u) * TREP + rep], a1 = vtab2[((phi[0][w] >> sh) & 255u) * TREP + rep];
            u32 a2 = vtab2[((plo[1][w] >> sh) & 255u) * TREP + rep], a3 = vtab2[((phi[1][w] >> sh) & 255u) * TREP + rep];
            mma16816(o[mb], a0, a1, a2, a3, pb0, pb1);
        }
#else
#pragma unroll
        for (int mb = 0; mb < D / 16; mb++) {
            u32 a[4];
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int pos = (2 * mb + e) * VB;
                a[e] = vtab2[(field<VB>(vw[0], pos) | (field<VB>(vw[1], pos) << VB)) * TREP + rep];
                a[2 + e] = vtab2[(field<VB>(vw[2], pos) | (field<VB>(vw[3], pos) << VB)) * TREP + rep];
            }
            mma16816(o[mb], a[0], a[1], a[2], a[3], pb0, pb1);
        }
#endif
        cur = nxt;
    }

    // ---- merge the warps of the block ----
    __syncthreads();  // every warp is done with the tables (wo reuses them)
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (r == 0) { wm[warp][n] = m; wl[warp][n] = l; }
    // O fragment: c0,c1: coordinate n*CPV + 2mb, heads 2r, 2r+1; c2,c3: coordinate + 1
#pragma unroll
    for (int mb = 0; mb < D / 16; mb++) {
        int c = n * CPV + 2 * mb;
        wo[warp][2 * r][c] = o[mb][0];
        wo[warp][2 * r + 1][c] = o[mb][1];
        wo[warp][2 * r][c + 1] = o[mb][2];
        wo[warp][2 * r + 1][c + 1] = o[mb][3];
    }
    __syncthreads();
    for (int i = tid; i < G * D; i += blockDim.x) {
        int g = i / D, j = i % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARP; w++) M = fmaxf(M, wm[w][g]);
        float L = 0.0f, O = 0.0f;
        if (M != NEG_INF) {
#pragma unroll
            for (int w = 0; w < NWARP; w++) {
                if (wm[w][g] == NEG_INF) continue;
                float f = __expf(wm[w][g] - M);
                L += f * wl[w][g];
                O += f * wo[w][g][j];
            }
        }
        u64 oi = (((u64)b * Hq + hq0 + g) * nsplit + split);
        po[oi * D + j] = O;
        if (j == 0) { pm[oi] = M; pl[oi] = L; }
    }
}
#endif
#endif

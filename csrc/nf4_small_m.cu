// y = x·Wᵀ (+ bias) for a few rows of x (M <= 16), W read straight from its packed NF4 bytes.
//
// Compiled at run time by qkern/_native.py (NVRTC, no headers), once per variant:
//   X_F16     0: bfloat16 x and y, 1: float16
//   NT        MMA column tiles of 8 rows of x: 1 (M <= 8) or 2 (M <= 16)
//   DQ        double-quantized absmax (uint8 codes + per-256-block fp32 scales + offset)
//   HAS_BIAS  add a bias (x's dtype) before the final rounding
//   WARPS     warps per block; they split the block's range of K between them
//   MIN_BLOCKS  blocks per SM the register allocation must allow (__launch_bounds__)
//
// Why native: the Triton kernels of qkern/qlora.py spend ~7-9 instructions per weight, mostly on
// the code-table gathers (64-bit global addresses, the 16-entry table read through L1), and at
// M <= 16 that, not DRAM, bounds them. Here the table lives in shared memory, replicated once per
// lane so that a warp's 32 lookups never conflict, and a lookup returns both weights of a packed
// byte already in the MMA's register format: per byte one shift, one mask-or and one LDS, i.e.
// ~1.5 instructions per weight before the tensor core does the products.
//
// Layout. A warp computes a 16 x (8·NT) tile of yᵀ = W·xᵀ with mma.m16n8k16 (W rows are the MMA's
// rows, x rows its columns), one quant chunk of 64 elements of K at a time: 4 MMAs of k16. Lane
// l = 4g + q holds W rows g and g + 8 of the tile. The MMA only needs the lanes' k indices to be
// the same for A and B, so K is permuted inside a chunk: lane q reads bytes 8q..8q+7 of each of
// its two rows (elements 16q..16q+15, one 8-byte load per row) and MMA i uses its bytes 2i and
// 2i+1, i.e. elements 16q+4i..16q+4i+3, as the logical k (2q, 2q+1, 2q+8, 2q+9). The B operand
// (x row g) then needs x elements 16q+4i..16q+4i+3: words 2i and 2i+1 of the lane's 32 bytes
// of x (two 16-byte loads).
// A chunk never straddles a quant block (blocksize % 64 == 0), so the 4 MMAs accumulate into a
// temporary that is scaled by the row's block scale in fp32 and added to the accumulator: the
// weight is the code rounded to the compute dtype, the scale applied to the fp32 sum of the
// products (one rounding of y at the end).
//
// Block scales: chunks are processed in groups of 4; lane q of a quad decodes the scales of chunk
// 4t + q for its two rows and the quad exchanges them with shuffles (one decode per lane per
// group instead of four).
//
// Split-K: gridDim.y blocks share a row tile; each stores its fp32 partial, bumps the tile's
// counter, and the last to arrive sums the partials in split order (deterministic), adds the
// bias, writes y and resets the counter to 0 for the next launch.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#ifndef DEPTH  // groups of W in registers: the one computing and DEPTH - 1 in flight
#define DEPTH 3
#endif
#ifndef CHAINS  // independent MMA accumulator chains per chunk (1, 2 or 4)
#define CHAINS 2
#endif
#ifndef L2_FETCH  // bytes an L2 miss of W fetches from DRAM (0: the default, 32-byte sectors)
#define L2_FETCH 128
#endif
#define TILE_COLS (8 * NT)

__device__ __forceinline__ uint2 load_w(const u8* p) {
    // the packed weight is streamed once: not kept in L1; a miss fetches the whole L2_FETCH-byte
    // span from DRAM (a warp reads a row's 128 bytes of a group as four 32-byte pieces, in four
    // loads, and the next group's bytes right after them)
    uint2 r;
#if L2_FETCH == 256
    asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];"
#elif L2_FETCH == 128
    asm("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0, %1}, [%2];"
#else
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
#endif
        : "=r"(r.x), "=r"(r.y)
        : "l"(p));
    return r;
}

__device__ __forceinline__ uint4 load_x(const u16* p) {
    // x is small and read by every row tile: keep it cached
    uint4 r;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                          u32 b1) {
#if X_F16
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u16 round_out(float v) {
    u16 r;
#if X_F16
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
#endif
    return r;
}

__device__ __forceinline__ float widen(u16 v) {
    float r;
#if X_F16
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v));
#else
    r = __uint_as_float((u32)v << 16);
#endif
    return r;
}

// fp32 scale of quant block blk: the stored absmax, or with double quant
// fp32(ncode[q_b] * nested[b / 256]) + offset with two roundings (never an FMA), as
// qkern.nf4.dequantize_4bit computes it
__device__ __forceinline__ float block_scale(const void* absmax, const float* nested,
                                             const float* ncode, u32 blk, float offset) {
#if DQ
    const u32 code = __ldg(reinterpret_cast<const u8*>(absmax) + blk);
    return __fadd_rn(__fmul_rn(__ldg(ncode + code), __ldg(nested + (blk >> 8))), offset);
#else
    return __ldg(reinterpret_cast<const float*>(absmax) + blk);
#endif
}

// the pair word of byte b for this lane: table entry (b, lane) at byte offset 128·b + 4·lane,
// lane_table being the shared-window address of entry (0, lane) (one LEA per lookup)
__device__ __forceinline__ u32 lookup(u32 lane_table, u32 b) {
    u32 v;
    // volatile: the lookups of the first items depend only on loads issued before the
    // barrier that publishes the table, and must not be hoisted above it
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(lane_table + (b << 7)));
    return v;
}

// One group of work for a warp: W's bytes of 4 chunks of K of one row tile, in registers.
struct WRegs {
    uint2 wa[4], wb[4];  // W rows g and g + 8: the lane's 8 bytes of each chunk
};

// W bytes of chunks c .. c+3 (those below w_hi) of rows g, g + 8; w0, w1 point at chunk c
__device__ __forceinline__ void load_w_group(WRegs& G, const u8* w0, const u8* w1, int c,
                                             int w_hi) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const bool live = c + j < w_hi;
        G.wa[j] = live ? load_w(w0 + 32 * j) : make_uint2(0, 0);
        G.wb[j] = live ? load_w(w1 + 32 * j) : make_uint2(0, 0);
    }
}

// acc += the group's products, chunk by chunk scaled by the rows' block scales; lane q of each
// quad holds the scales of chunk q of the group (sq0 for row g, sq1 for row g + 8). x is read
// here, chunk by chunk from x0, x1 (pointing at chunk c; a block's warps reread the same slices of x for every row tile: L1 hits
// after the first), so that only W's bytes are held in registers across the prefetch distance.
__device__ __forceinline__ void mma_group(float (&acc)[NT][4], const WRegs& G, const u16* x0,
                                          const u16* x1, bool x_ok0, bool x_ok1, int c, int w_hi,
                                          u32 lane_table, float sq0, float sq1, int lane) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const bool live = c + j < w_hi;
        const uint4 zero = make_uint4(0, 0, 0, 0);
        uint4 xv[NT][2];
        xv[0][0] = (live && x_ok0) ? load_x(x0 + 64 * j) : zero;
        xv[0][1] = (live && x_ok0) ? load_x(x0 + 64 * j + 8) : zero;
#if NT == 2
        xv[1][0] = (live && x_ok1) ? load_x(x1 + 64 * j) : zero;
        xv[1][1] = (live && x_ok1) ? load_x(x1 + 64 * j + 8) : zero;
#endif
        const float s0 = __shfl_sync(FULL_MASK, sq0, (lane & ~3) | j);
        const float s1 = __shfl_sync(FULL_MASK, sq1, (lane & ~3) | j);
        // CHAINS independent accumulators: the 4 MMAs of a chunk form CHAINS dependency chains
        float part_sum[CHAINS][NT][4];
#pragma unroll
        for (int h = 0; h < CHAINS; ++h)
#pragma unroll
            for (int t = 0; t < NT; ++t)
                part_sum[h][t][0] = part_sum[h][t][1] = part_sum[h][t][2] = part_sum[h][t][3] = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // bytes 2i and 2i+1 of the lane's 8: bytes 2(i&1), 2(i&1)+1 of word i/2, each
            // pulled out zero-extended by one byte permute
            const u32 v0 = i < 2 ? G.wa[j].x : G.wa[j].y;
            const u32 v1 = i < 2 ? G.wb[j].x : G.wb[j].y;
            const u32 lo = 0x4440 + 2 * (i & 1), hi = lo + 1;
            const u32 a0 = lookup(lane_table, __byte_perm(v0, 0, lo));  // row g,     k 2q, 2q+1
            const u32 a1 = lookup(lane_table, __byte_perm(v1, 0, lo));  // row g + 8, k 2q, 2q+1
            const u32 a2 = lookup(lane_table, __byte_perm(v0, 0, hi));  // row g,     k 2q+8, +9
            const u32 a3 = lookup(lane_table, __byte_perm(v1, 0, hi));  // row g + 8, k 2q+8, +9
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const uint4 h = xv[t][i >> 1];
                const u32 b0 = (i & 1) ? h.z : h.x;
                const u32 b1 = (i & 1) ? h.w : h.y;
                mma_16816(part_sum[i % CHAINS][t], a0, a1, a2, a3, b0, b1);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int h = 1; h < CHAINS; ++h)
#pragma unroll
                for (int v = 0; v < 4; ++v) part_sum[0][t][v] += part_sum[h][t][v];
            acc[t][0] = fmaf(part_sum[0][t][0], s0, acc[t][0]);
            acc[t][1] = fmaf(part_sum[0][t][1], s0, acc[t][1]);
            acc[t][2] = fmaf(part_sum[0][t][2], s1, acc[t][2]);
            acc[t][3] = fmaf(part_sum[0][t][3], s1, acc[t][3]);
        }
    }
}

// The grid: gridDim.y splits of K; along x, blocks that each walk the row tiles blockIdx.x,
// blockIdx.x + gridDim.x, ... (about one wave of resident blocks, so the code table is built
// once per block and the loads of the next tile are in flight while this one computes). Each
// warp owns the same groups of K in every tile; a warp's work items (tile, group) run in order
// with the next item's loads issued before the current item's MMAs (registers double-buffered).
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
nf4_small_m(const u16* __restrict__ x, const u8* __restrict__ w, const void* __restrict__ absmax,
            const float* __restrict__ nested, const float* __restrict__ ncode,
            const u32* __restrict__ pair, const u16* __restrict__ bias, u16* __restrict__ y,
            float* __restrict__ part, int* __restrict__ locks, int M, int N, int K, int bs_log2,
            int chunks_per_split, double offset_d) {
    // 256 byte values x 32 lane copies of the pair word (32 KB)
    __shared__ __align__(16) u32 table[256 * 32];
    // the warps' partial tiles: red[warp][row][col], col = row of x
    __shared__ float red[WARPS * 16 * TILE_COLS];
    __shared__ int last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const float offset = (float)offset_d;

    // this warp's chunks of K: whole groups of 4 of the block's split
    const int n_chunks = K >> 6;
    const int c_lo = blockIdx.y * chunks_per_split;
    const int c_hi = min(n_chunks, c_lo + chunks_per_split);
    const int gpw = ((c_hi - c_lo + 3) / 4 + WARPS - 1) / WARPS;  // groups per warp and tile
    const int w_lo = c_lo + warp * gpw * 4;
    const int w_hi = min(c_hi, w_lo + gpw * 4);
    const int tiles = (N + 15) >> 4;
    const int my_tiles = (tiles - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;
    const int items = my_tiles * gpw;

    // 32-bit element and byte indices: the host sends only weights with N·K < 2^31
    const u32 row_bytes = (u32)K >> 1;
    // rows of x past M contribute zeros
    const bool x_ok0 = g < M;
    const u16* x0 = x + (u32)(x_ok0 ? g : 0) * (u32)K + 16 * q;
#if NT == 2
    const bool x_ok1 = g + 8 < M;
    const u16* x1 = x + (u32)(x_ok1 ? g + 8 : 0) * (u32)K + 16 * q;
#else
    const bool x_ok1 = false;
    const u16* x1 = x0;
#endif

    // W of item (tile, grp) into G and its scales into s0, s1: rows past N read row 0 (valid
    // memory, never stored); lane q decodes the scales of chunk (first + q), clamped (a chunk
    // past the end has zero x and any finite scale)
    auto fetch = [&](int tile, int grp, WRegs& G, float& s0, float& s1) {
        const int row0 = tile * 16 + g;
        const u32 r0 = row0 < N ? row0 : 0, r1 = row0 + 8 < N ? row0 + 8 : 0;
        const int c = w_lo + 4 * grp;
        load_w_group(G, w + r0 * row_bytes + 32 * c + 8 * q, w + r1 * row_bytes + 32 * c + 8 * q,
                     c, w_hi);
        const u32 cq = (u32)min(c + q, n_chunks - 1) << 6;
        s0 = block_scale(absmax, nested, ncode, (r0 * (u32)K + cq) >> bs_log2, offset);
        s1 = block_scale(absmax, nested, ncode, (r1 * (u32)K + cq) >> bs_log2, offset);
    };

    // W of items 0 .. DEPTH-2 goes out before the table is built; item it + DEPTH - 1 is
    // loaded while item it computes (a ring of DEPTH register groups, indexed statically by
    // unrolling the loop DEPTH times). Items run tile by tile, gpw groups each: cursors
    // (tile, group) for the item computing and the item fetching.
    WRegs ring[DEPTH];
    float rs0[DEPTH], rs1[DEPTH];
    int f_tile = blockIdx.x, f_grp = 0;
    auto advance = [&](int& tile, int& grp) {
        if (++grp == gpw) {
            grp = 0;
            tile += gridDim.x;
        }
    };
#pragma unroll
    for (int d = 0; d < DEPTH - 1; ++d) {
        if (d < items) fetch(f_tile, f_grp, ring[d], rs0[d], rs1[d]);
        advance(f_tile, f_grp);
    }
    for (int i = tid; i < 2048; i += WARPS * 32) {
        const u32 v = __ldg(pair + (i >> 3));
        reinterpret_cast<uint4*>(table)[i] = make_uint4(v, v, v, v);
    }
    const u32 lane_table = (u32)__cvta_generic_to_shared(table) + 4 * lane;
    __syncthreads();

    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
    const int splits = gridDim.y;
    int tile = blockIdx.x, grp = 0;

    for (int base = 0; base < items; base += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
        const int it = base + d;
        if (it >= items) break;
        const int e = (d + DEPTH - 1) % DEPTH;  // static once unrolled
        if (it + DEPTH - 1 < items) fetch(f_tile, f_grp, ring[e], rs0[e], rs1[e]);
        advance(f_tile, f_grp);
        const int c = w_lo + 4 * grp;
        mma_group(acc, ring[d], x0 + 64 * c, x1 + 64 * c, x_ok0, x_ok1, c, w_hi, lane_table,
                  rs0[d], rs1[d], lane);

        if (grp == gpw - 1) {
            // the tile is done in every warp (all warps run the same number of items)
            float* r = red + warp * 16 * TILE_COLS;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const int col = 8 * t + 2 * q;
                r[g * TILE_COLS + col] = acc[t][0];
                r[g * TILE_COLS + col + 1] = acc[t][1];
                r[(g + 8) * TILE_COLS + col] = acc[t][2];
                r[(g + 8) * TILE_COLS + col + 1] = acc[t][3];
                acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
            }
            __syncthreads();
            const u64 tile_base = (u64)tile * splits * 16 * TILE_COLS;
            // thread o owns output o of the tile (16 x TILE_COLS <= 256 <= threads... or loops)
            for (int o = tid; o < 16 * TILE_COLS; o += WARPS * 32) {
                float v = 0.f;
#pragma unroll
                for (int u = 0; u < WARPS; ++u) v += red[u * 16 * TILE_COLS + o];
                red[o] = v;  // only thread o reads and writes red[o] from here on
                if (splits > 1) part[tile_base + (u64)blockIdx.y * 16 * TILE_COLS + o] = v;
            }
            bool store = true;
            if (splits > 1) {
                __threadfence();
                __syncthreads();
                if (tid == 0) last = atomicAdd(locks + tile, 1) == splits - 1;
                __syncthreads();
                store = last;
                if (store) {
                    __threadfence();
                    for (int o = tid; o < 16 * TILE_COLS; o += WARPS * 32) {
                        float v = 0.f;
                        for (int u = 0; u < splits; ++u)
                            v += __ldcg(part + tile_base + (u64)u * 16 * TILE_COLS + o);
                        red[o] = v;
                    }
                    if (tid == 0) locks[tile] = 0;
                }
            }
            if (store) {
                for (int o = tid; o < 16 * TILE_COLS; o += WARPS * 32) {
                    const int rr = o / TILE_COLS, m = o % TILE_COLS;
                    const int n = tile * 16 + rr;
                    if (n < N && m < M) {
                        float v = red[o];
#if HAS_BIAS
                        v += widen(bias[n]);
#endif
                        y[(u64)m * N + n] = round_out(v);
                    }
                }
            }
            __syncthreads();  // red is rewritten by the next tile
        }
        advance(tile, grp);
    }
    }
}

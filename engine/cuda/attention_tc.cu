// Tensor-core variants of the training attention kernels: AttentionForwardTC / AttentionBackwardTC
// (kernels.h). Same contracts, layouts and masking as AttentionForward / AttentionBackward in
// attention.cu (f32 in and out in global memory, lse in natural log, packed variable-length causal
// GQA), but the products QK^T, PV and the five backward products run on the tensor cores:
// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, operands rounded to bf16 when a tile is
// copied into shared memory (or, for P and dS^T, when the f32 fragment is repacked), accumulation,
// softmax statistics, dq/dk/dv in f32. Head widths 64 and 128; any other D goes to the f32 kernels.
// Design and cost model: docs/kernels.md ("Tensor-core variant").
//
// Conventions (shared with attention.cu):
//  - Scores in the log2 domain (q pre-scaled by scale * log2 e; weights exp2(s - m)); lse is
//    stored in natural-log units: lse = (m + log2 l) ln 2.
//  - Row r of the packed axis sees key j iff seqstart(r) <= j <= r, applied to every (row, key) pair
//    of a tile, so tiles may span sequences. Rows or keys past N are zero-filled and masked; nothing
//    past N is written.
//
// Fragment layouts of mma.m16n8k16 and ldmatrix: attention_internal.h (PackBf16, LdMatrixX4[T] and
// Mma live there, shared with the tensor-core decode kernel in attention.cu). The C fragments of two
// adjacent n-tiles (columns 16 s .. 16 s + 15) are, repacked to bf16, the A fragment of k-step s: P
// and dS^T never go through shared memory as A operands of the next product. B fragments and the dS
// A fragments come from shared memory with ldmatrix.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "engine/cuda/attention_internal.h"
#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {
namespace {

// ---- device helpers ---------------------------------------------------------------------------------

// dst[0..3] = bf16(x); dst is 8-byte aligned.
__device__ __forceinline__ void StoreBf16x4(uint16_t* dst, float4 x) {
  *reinterpret_cast<uint2*>(dst) = PackBf16x4(x);
}

constexpr int kThreads = 256;  // 8 warps, both kernels

template <int D>
struct TcCfg {
  static_assert(D == 64 || D == 128, "tensor-core attention: head width 64 or 128");
  static constexpr int D4 = D / 4;
  static constexpr int KK = D / 16;  // k-steps of 16 over D
  static constexpr int DN = D / 8;   // n-tiles of 8 over D
  // bf16 row stride of [rows][D] tiles in shared memory: D + 8 elements = 16 B of padding, so the
  // 8 rows of one ldmatrix matrix (stride 144 or 272 B) fall into 8 different 16-byte bank groups,
  // and so do the 8 rows g of a lane quad's 32-bit accesses.
  static constexpr int LD = D + 8;
};

// A tile of rows [row0, row0 + ROWS) of head `head` of x[N, H, D] goes global -> shared f32 staging
// (cp.async, zeros past N) -> shared bf16 [ROWS][LD]. Thread tid moves the 16-byte chunks
// f = tid + 256 i: row f / (D/4), float4 column f % (D/4) (consecutive threads on consecutive chunks
// of a row), and stages chunk f at stage[4 f]. Convert reads back only the chunks this thread
// copied, so after its own cp.async.wait_group no barrier is needed between the two.
template <int D, int ROWS>
struct StagedTile {
  static constexpr int D4 = TcCfg<D>::D4, LD = TcCfg<D>::LD;
  static constexpr int kPer = ROWS * D4 / kThreads;
  static constexpr int kStageFloats = ROWS * D;
  static_assert(kPer * kThreads == ROWS * D4, "tile must split evenly over the block");

  static __device__ __forceinline__ void Issue(float* stage, const float* __restrict__ src, int row0, int N, int H,
                                               int head) {
#pragma unroll
    for (int it = 0; it < kPer; ++it) {
      const int f = threadIdx.x + it * kThreads;
      const int rr = f / D4, d4 = f % D4;
      const int r = row0 + rr;
      const bool valid = r < N;
      CpAsync16(stage + 4 * f, src + (static_cast<size_t>(valid ? r : 0) * H + head) * D + d4 * 4, valid);
    }
  }
  static __device__ __forceinline__ void Convert(uint16_t* dst, const float* stage) {
#pragma unroll
    for (int it = 0; it < kPer; ++it) {
      const int f = threadIdx.x + it * kThreads;
      const int rr = f / D4, d4 = f % D4;
      StoreBf16x4(dst + rr * LD + d4 * 4, *reinterpret_cast<const float4*>(stage + 4 * f));
    }
  }
};

// A tile of rows [row0, row0 + ROWS) of head `head` of a bf16 x[N, H, D] goes global -> shared bf16
// [ROWS][LD] directly (cp.async of 16-byte chunks, 8 elements; zeros past N): nothing to convert.
template <int D, int ROWS>
struct Bf16Tile {
  static constexpr int D8 = D / 8, LD = TcCfg<D>::LD;
  static constexpr int kPer = ROWS * D8 / kThreads;
  static_assert(kPer * kThreads == ROWS * D8, "tile must split evenly over the block");
  static __device__ __forceinline__ void Issue(uint16_t* dst, const uint16_t* __restrict__ src, int row0, int N,
                                               int H, int head) {
#pragma unroll
    for (int it = 0; it < kPer; ++it) {
      const int f = threadIdx.x + it * kThreads;
      const int rr = f / D8, c8 = f % D8;
      const int r = row0 + rr;
      const bool valid = r < N;
      CpAsync16(dst + rr * LD + c8 * 8, src + (static_cast<size_t>(valid ? r : 0) * H + head) * D + c8 * 8, valid);
    }
  }
};

// ---- forward --------------------------------------------------------------------------------------
// Grid (Hq, ceil(N / 128)), 256 threads. Block = 128 consecutive rows of the packed axis x one query
// head; warp w owns rows 16 w .. 16 w + 15 (its Q fragments live in registers for the whole loop,
// pre-scaled by scale * log2 e and rounded to bf16). Keys run over 64-aligned tiles of 64 from the
// tile holding the first row's sequence start to the last row. K/V tiles: cp.async copies of tile
// t+1 (f32, into a staging area) are issued before tile t is computed; after it each thread
// converts the chunks it copied into the other bf16 buffer (one barrier per tile). A warp skips a
// tile in which none of its rows sees a key.
// Per tile and warp: S = Q K^T (16 x 64, 8 n-tiles x D/16 k-steps), mask, online softmax on the C
// fragments (a row's 64 scores live in the 4 lanes of a quad), P repacked to bf16 as A fragments,
// O += P V (D/8 n-tiles x 4 k-steps). Shared: 2 x (Ks, Vs [64][D+8] bf16), staging K, V [64][D]
// f32, row starts [128].
// With bf16 K and V in global memory (Kv = uint16_t: QkvRopeAttention's copies) the next tile's
// cp.async copies go straight into the other bf16 buffer: no staging area, no conversion.
constexpr int kFwdRows = 128;
constexpr int kFwdKeys = 64;

template <int D, typename Kv>
constexpr size_t FwdTcSmemBytes() {
  constexpr size_t staging = sizeof(Kv) == sizeof(float) ? 2 * kFwdKeys * D * sizeof(float) : 0;
  return 4 * kFwdKeys * TcCfg<D>::LD * sizeof(uint16_t) + staging + kFwdRows * sizeof(int);
}

template <int D, typename Kv>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 2 : 1)
    AttnFwdTcKernel(float* __restrict__ out, uint16_t* __restrict__ out16, float* __restrict__ lse,
                    const float* __restrict__ q,
                    const Kv* __restrict__ k, const Kv* __restrict__ v, const int32_t* __restrict__ cu, int S,
                    int N, int Hq, int Hkv, float qscale) {
  using C = TcCfg<D>;
  constexpr int LD = C::LD, KK = C::KK, DN = C::DN;
  constexpr int kBuf = 2 * kFwdKeys * LD;  // one buffer: Ks then Vs
  constexpr bool kStaged = sizeof(Kv) == sizeof(float);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  using Tile = StagedTile<D, kFwdKeys>;
  using Tile16 = Bf16Tile<D, kFwdKeys>;
  uint16_t* KV = reinterpret_cast<uint16_t*>(smem_raw);
  float* stK = reinterpret_cast<float*>(smem_raw + 2 * kBuf * sizeof(uint16_t));  // f32 staging of K
  float* stV = stK + (kStaged ? Tile::kStageFloats : 0);                           // and V
  int* row_ss = reinterpret_cast<int*>(stV + (kStaged ? Tile::kStageFloats : 0));  // INT_MAX past N
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // Heads vary fastest and row blocks run from the last: the heavy blocks (far from their
  // sequence's start: more key tiles) go out first and light ones fill the tail of the grid.
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int r0 = (gridDim.y - 1 - blockIdx.y) * kFwdRows;
  // The next tile's copies into buffer b (bf16: directly; f32: into the staging area).
  auto issue = [&](int row0, int b) {
    if constexpr (kStaged) {
      Tile::Issue(stK, k, row0, N, Hkv, kvh);
      Tile::Issue(stV, v, row0, N, Hkv, kvh);
    } else {
      Tile16::Issue(KV + b * kBuf, k, row0, N, Hkv, kvh);
      Tile16::Issue(KV + b * kBuf + kFwdKeys * LD, v, row0, N, Hkv, kvh);
    }
    CpAsyncCommit();
  };
  // After CpAsyncWaitAll: the staged f32 chunks this thread copied, converted into buffer b.
  auto land = [&](int b) {
    if constexpr (kStaged) {
      Tile::Convert(KV + b * kBuf, stK);
      Tile::Convert(KV + b * kBuf + kFwdKeys * LD, stV);
    }
  };

  const int r_last = min(r0 + kFwdRows, N) - 1;

  // Row starts, and the Q fragments of this warp's 16 rows: rows rowA = wr0 + g and rowB = rowA + 8.
  const int wr0 = r0 + warp * 16;
  const int rowA = wr0 + g, rowB = rowA + 8;
  uint32_t qa[KK][4];
  ForwardPrologue<D>(row_ss, qa, q, cu, S, N, Hq, h, r0, kFwdRows, tid, rowA, rowB, t, qscale);
  __syncthreads();  // row_ss

  const int w_ss0 = row_ss[warp * 16];  // smallest sequence start of the warp's rows (INT_MAX: no rows)
  const int w_last = min(wr0 + 15, N - 1);
  const int k_begin = (row_ss[0] / kFwdKeys) * kFwdKeys;  // row r0 < N, so row_ss[0] is a real start

  issue(k_begin, 0);
  CpAsyncWaitAll();
  land(0);
  __syncthreads();

  float o[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;

  int buf = 0;
  for (int kt = k_begin; kt <= r_last; kt += kFwdKeys, buf ^= 1) {
    const bool has_next = kt + kFwdKeys <= r_last;
    // In flight while this tile is computed: the staging area was last read by this thread, and
    // the other buffer by every warp, before the previous barrier.
    if (has_next) issue(kt + kFwdKeys, buf ^ 1);
    const uint16_t* Ks = KV + buf * kBuf;
    const uint16_t* Vs = Ks + kFwdKeys * LD;

    // Some row of the warp sees some key of the tile only if kt <= last row and kt + 63 >= first start.
    if (kt <= w_last && kt + kFwdKeys - 1 >= w_ss0) {
      // s[nt] = Q K^T for keys kt + nt*8 .. + 7 (log2 domain).
      float s[8][4];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk2 = 0; kk2 < KK / 2; ++kk2) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          // Matrix i: keys nt*8 .. +7, columns kk2*32 + 8 i .. +7 -> b0, b1 of k-step 2 kk2, then of 2 kk2 + 1.
          uint32_t b[4];
          LdMatrixX4(b, Ks + (nt * 8 + (lane & 7)) * LD + kk2 * 32 + (lane >> 3) * 8);
          Mma(s[nt], qa[2 * kk2], b[0], b[1]);
          Mma(s[nt], qa[2 * kk2 + 1], b[2], b[3]);
        }
      }

      // Mask (only on tiles that some row of the warp sees in part: the diagonal and a sequence's
      // start); online softmax. c = 0, 1: row rowA; c = 2, 3: row rowB; key kt + nt*8 + 2t + (c & 1).
      // The largest start of the warp's rows (starts do not decrease along the packed axis; INT_MAX
      // when a row is past N) and the rows' own starts are read from shared memory here, not kept
      // in registers across the loop (the kernel is at its 128-register bound).
      if (kt < row_ss[warp * 16 + 15] || kt + kFwdKeys - 1 > wr0) {
        MaskScores(s, kt, row_ss[warp * 16 + g], row_ss[warp * 16 + g + 8], rowA, rowB, t);
      }
      OnlineSoftmaxStep(s, o, mA, mB, lA, lB);

      // O += P V. A fragment of k-step kk (keys kk*16 .. +15) = C fragments of n-tiles 2 kk, 2 kk + 1.
#pragma unroll
      for (int kk = 0; kk < kFwdKeys / 16; ++kk) {
        uint32_t pa[4];
        PackPFrag(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
        for (int dn2 = 0; dn2 < DN / 2; ++dn2) {
          // Matrix i: keys kk*16 + 8 (i & 1) .. +7, columns (2 dn2 + i / 2) * 8 .. +7, transposed
          // -> b0, b1 of n-tile 2 dn2, then of 2 dn2 + 1.
          uint32_t b[4];
          LdMatrixX4T(b, Vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (2 * dn2 + (lane >> 4)) * 8);
          Mma(o[2 * dn2], pa, b[0], b[1]);
          Mma(o[2 * dn2 + 1], pa, b[2], b[3]);
        }
      }
    }

    if (has_next) {  // into the other buffer, which nobody reads this iteration
      CpAsyncWaitAll();  // this thread's chunks of tile kt + 64 have landed
      land(buf ^ 1);
    }
    __syncthreads();  // the next tile is in; everyone is done with this one
  }

  StoreForwardRows<D>(out, out16, lse, o, mA, mB, lA, lB, rowA, rowB, N, Hq, h, t);
}

// ---- backward -------------------------------------------------------------------------------------
// Pre-pass: attention.cu's AttentionBackwardPrepass (delta = dout . out, row starts).

// Main backward: grid (Hq, ceil(N / 128)), 256 threads. Block = 128 consecutive keys of the packed
// axis x one QUERY head h (the G query heads of a kv head are G blocks whose dk/dv meet through
// atomics); warp w owns keys k0 + 16 w .. + 15. The block loops over query tiles of 32 rows from k0
// to the end of its last key's sequence (r_stop). Per query tile (Q, dO in shared memory as bf16,
// double-buffered: cp.async copies of tile t+1 into an f32 staging area are in flight while tile t
// is computed, and are converted into the other buffer after it):
//  phase 1, warp w, keys on the fragment rows, query rows on the columns (4 n-tiles of 8):
//    S^T = K Q^T, dP^T = V dO^T (D/16 k-steps; K and V A fragments by ldmatrix from Ks, Vs),
//    P^T = exp2(S^T scale log2e - lse log2e) masked, dS^T = P^T (dP^T - delta);
//    dV += P^T dO, dK += dS^T Q (P^T, dS^T repacked as A fragments; 16 x D f32 accumulators in
//    registers for the whole loop); dS^T to shared memory as bf16. A warp whose keys no row of the
//    tile can see writes zeros instead.
//  phase 2 (after a barrier): dQ = dS K for the 32 x D tile, warp w: rows 16 (w & 1) .. + 15 and
//    D/4 columns from (w >> 1) D/4; A fragments of dS by ldmatrix.trans from dS^T; added into dq
//    with float4 atomics (rows >= r_stop skipped: they see none of the keys).
// At the end scale * dK and dV are added into dk, dv with float4 atomics. Shared (bf16 unless
// noted): Ks, Vs [128][D+8]; 2 x (Qs, dOs [32][D+8]); dSs [128][40]; staging Q, dO [32][D] (f32);
// 2 x lse log2e, delta (f32) and row starts (i32) [32]; r_stop.
constexpr int kBwdKeys = 128;
constexpr int kBwdRows = 32;
constexpr int kLDS = kBwdRows + 8;  // dS^T row stride (80 B: ldmatrix rows and quad stores conflict-free)

template <int D>
constexpr size_t BwdTcSmemBytes() {
  constexpr int LD = TcCfg<D>::LD;
  return (2 * kBwdKeys * LD + 4 * kBwdRows * LD + kBwdKeys * kLDS) * sizeof(uint16_t) +
         2 * kBwdRows * D * sizeof(float) + 2 * 2 * kBwdRows * sizeof(float) + 2 * kBwdRows * sizeof(int) +
         4 * sizeof(int);
}

template <int D>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 2 : 1)
    AttnBwdTcKernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                    const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                    const float* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                    const int* __restrict__ row_start, const int32_t* __restrict__ cu, int S, int N, int Hq,
                    int Hkv, float scale) {
  using C = TcCfg<D>;
  using Tile = StagedTile<D, kBwdRows>;
  constexpr int LD = C::LD, KK = C::KK, DN = C::DN, D4 = C::D4;
  constexpr int DQN = D / 32;               // dQ n-tiles per warp (8 warps: 2 row halves x 4 column quarters)
  constexpr int kQBuf = 2 * kBwdRows * LD;  // one buffer: Qs then dOs
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* Vs = Ks + kBwdKeys * LD;
  uint16_t* QO = Vs + kBwdKeys * LD;  // buffer b: Qs = QO + b * kQBuf, dOs = Qs + 32 * LD
  uint16_t* dSs = QO + 2 * kQBuf;     // [key][row], stride kLDS
  float* stQ = reinterpret_cast<float*>(dSs + kBwdKeys * kLDS);  // f32 staging of Q
  float* stO = stQ + Tile::kStageFloats;                         // and dO
  float* lse2s = stO + Tile::kStageFloats;                       // [2][32]
  float* dls = lse2s + 2 * kBwdRows;                             // [2][32]
  int* sss = reinterpret_cast<int*>(dls + 2 * kBwdRows);         // [2][32]
  int* r_stop_s = sss + 2 * kBwdRows;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // Heads vary fastest and key blocks run from the first: the heavy blocks (far from their
  // sequence's end: more query tiles) go out first and light ones fill the tail of the grid.
  const int h = blockIdx.x, kvh = h / (Hq / Hkv);
  const int k0 = blockIdx.y * kBwdKeys;
  const int k_last = min(k0 + kBwdKeys, N) - 1;
  const float scale_log2 = scale * kLog2e;

  // Query tile rows k0 .. k0 + 31 (rows < k0 see none of the keys; k0 < r_stop): copies start now.
  Tile::Issue(stQ, q, k0, N, Hq, h);
  Tile::Issue(stO, dout, k0, N, Hq, h);
  CpAsyncCommit();
  RowStats st_next;
  if (tid < kBwdRows) st_next.Load(lse, delta, row_start, k0 + tid, N, Hq, h);

  // K, V of the block's keys as bf16 (zeros past N), once.
#pragma unroll 4
  for (int f = tid; f < kBwdKeys * D4; f += kThreads) {
    const int rr = f / D4, d4 = f % D4;
    const int key = k0 + rr;
    float4 kx = Zero4(), vx = Zero4();
    if (key < N) {
      const size_t off = (static_cast<size_t>(key) * Hkv + kvh) * D + d4 * 4;
      kx = Ldg4(k + off);
      vx = Ldg4(v + off);
    }
    StoreBf16x4(Ks + rr * LD + d4 * 4, kx);
    StoreBf16x4(Vs + rr * LD + d4 * 4, vx);
  }
  if (tid == 0) *r_stop_s = __ldg(cu + FindSeq(cu, S, k_last) + 1);  // end of the last key's sequence

  CpAsyncWaitAll();
  Tile::Convert(QO, stQ);
  Tile::Convert(QO + kBwdRows * LD, stO);
  if (tid < kBwdRows) {
    st_next.Store(lse2s, dls, sss, tid);
  }
  __syncthreads();
  const int r_stop = *r_stop_s;  // rows >= r_stop belong to later sequences; r_stop <= N

  const int wk0 = k0 + warp * 16;
  const int keyA = wk0 + g, keyB = keyA + 8;
  float dKa[DN][4], dVa[DN][4];
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dKa[dn][c] = dVa[dn][c] = 0.0f;
  }

  int buf = 0;
  for (int rt = k0; rt < r_stop; rt += kBwdRows, buf ^= 1) {
    const bool has_next = rt + kBwdRows < r_stop;
    if (has_next) {  // in flight while this tile is computed (the staging area was last read by this
                     // thread, before the previous barrier)
      Tile::Issue(stQ, q, rt + kBwdRows, N, Hq, h);
      Tile::Issue(stO, dout, rt + kBwdRows, N, Hq, h);
      CpAsyncCommit();
      if (tid < kBwdRows) st_next.Load(lse, delta, row_start, rt + kBwdRows + tid, N, Hq, h);
    }
    const uint16_t* Qs = QO + buf * kQBuf;
    const uint16_t* dOs = Qs + kBwdRows * LD;
    const float* l2 = lse2s + buf * kBwdRows;
    const float* dl = dls + buf * kBwdRows;
    const int* ssr = sss + buf * kBwdRows;

    // ---- phase 1: this warp's 16 keys x the tile's 32 rows
    // A row of the tile sees a key of the warp only if rt + 31 >= first key and start(rt) <= last key.
    if (wk0 < N && rt + kBwdRows - 1 >= wk0 && ssr[0] <= wk0 + 15) {
      // A fragments for k-step kk: matrix i = keys 16 w + 8 (i & 1) .. +7, columns kk*16 + 8 (i >> 1)
      // .. +7 -> a0, a1, a2, a3. B = Q^T, dO^T (k = d, n = row): matrix i = rows ks*16 + 8 (i >> 1)
      // .. +7, columns kk*16 + 8 (i & 1) .. +7 -> b0, b1 of row n-tile 2 ks, then of 2 ks + 1.
      const int a_off = (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
      const int b_off = ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
      // B = dO, Q (k = row, n = d) for dV, dK: matrix i = rows ks*16 + 8 (i & 1) .. +7, columns
      // (2 dn2 + i / 2) * 8 .. +7, transposed -> b0, b1 of n-tile 2 dn2, then of 2 dn2 + 1.
      const int bt_off = (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
      // Every row of the tile sees all 16 keys of the warp: the last key is at or before the first
      // row, and the last row's sequence (starts do not decrease; INT_MAX past N) starts at or
      // before the first key.
      const bool whole = wk0 + 15 <= rt && ssr[kBwdRows - 1] <= wk0;
      // The tile's rows in two halves of 16 (k-step ks of dV, dK), one after the other (registers).
#pragma unroll 1
      for (int ks = 0; ks < kBwdRows / 16; ++ks) {
        // sT[n], dpT[n]: keys keyA (c = 0, 1), keyB (c = 2, 3) x rows ks*16 + n*8 + 2t + (c & 1).
        float sT[2][4], dpT[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int c = 0; c < 4; ++c) sT[n][c] = dpT[n][c] = 0.0f;
        }
        // S^T = K Q^T, then dP^T = V dO^T.
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          uint32_t ka[4], bq[4];
          LdMatrixX4(ka, Ks + a_off + kk * 16);
          LdMatrixX4(bq, Qs + b_off + ks * 16 * LD + kk * 16);
          Mma(sT[0], ka, bq[0], bq[1]);
          Mma(sT[1], ka, bq[2], bq[3]);
        }
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          uint32_t va[4], bo[4];
          LdMatrixX4(va, Vs + a_off + kk * 16);
          LdMatrixX4(bo, dOs + b_off + ks * 16 * LD + kk * 16);
          Mma(dpT[0], va, bo[0], bo[1]);
          Mma(dpT[1], va, bo[2], bo[3]);
        }
        // P^T and dS^T; the mask only where some row of the tile sees the warp's keys in part. Two
        // compiled branches: the mask as a per-score `whole || ...` test measured 6% slower.
        auto p_and_ds = [&](auto masked) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int jr = ks * 16 + n * 8 + 2 * t + (c & 1);
              bool ok = true;
              if constexpr (decltype(masked)::value) {
                const int key = c < 2 ? keyA : keyB;
                ok = key >= ssr[jr] && key <= rt + jr;  // ssr = INT_MAX past N
              }
              const float p = ok ? Exp2Ftz(fmaf(sT[n][c], scale_log2, -l2[jr])) : 0.0f;
              sT[n][c] = p;
              dpT[n][c] = p * (dpT[n][c] - dl[jr]);
            }
          }
        };
        if (whole) p_and_ds(std::false_type{});
        else p_and_ds(std::true_type{});
        // As A fragments (rows = keys, k = the 16 rows of this half); dS^T (bf16) to shared memory,
        // row = local key, column = local query row.
        uint32_t pa[4], sa[4];
        PackPFrag(pa, sT[0], sT[1]);
        PackPFrag(sa, dpT[0], dpT[1]);
        uint16_t* dsA = dSs + (warp * 16 + g) * kLDS + ks * 16 + 2 * t;  // key keyA, rows ks*16 + 2t, +1
        uint16_t* dsB = dsA + 8 * kLDS;                                   // key keyB
        *reinterpret_cast<uint32_t*>(dsA) = sa[0];
        *reinterpret_cast<uint32_t*>(dsB) = sa[1];
        *reinterpret_cast<uint32_t*>(dsA + 8) = sa[2];  // rows ks*16 + 8 + 2t, +1
        *reinterpret_cast<uint32_t*>(dsB + 8) = sa[3];
        // dV += P^T dO, dK += dS^T Q.
#pragma unroll
        for (int dn2 = 0; dn2 < DN / 2; ++dn2) {
          const int off = bt_off + ks * 16 * LD + dn2 * 16;
          uint32_t bo[4], bq[4];
          LdMatrixX4T(bo, dOs + off);
          LdMatrixX4T(bq, Qs + off);
          Mma(dVa[2 * dn2], pa, bo[0], bo[1]);
          Mma(dVa[2 * dn2 + 1], pa, bo[2], bo[3]);
          Mma(dKa[2 * dn2], sa, bq[0], bq[1]);
          Mma(dKa[2 * dn2 + 1], sa, bq[2], bq[3]);
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        *reinterpret_cast<uint32_t*>(dSs + (warp * 16 + g) * kLDS + nt * 8 + 2 * t) = 0u;
        *reinterpret_cast<uint32_t*>(dSs + (warp * 16 + g + 8) * kLDS + nt * 8 + 2 * t) = 0u;
      }
    }
    __syncthreads();  // dS^T complete

    // ---- phase 2: dQ[rows qrow0 .. +15][columns (dn0 .. dn0 + DQN) * 8] = scale * dS K
    const int rb = warp & 1, dn0 = (warp >> 1) * DQN;
    const int qrow0 = rt + rb * 16;
    if (qrow0 < r_stop) {
      float acc[DQN][4];
#pragma unroll
      for (int j = 0; j < DQN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kBwdKeys / 16; ++kk) {
        // A = dS (row x key) from dS^T [key][row]. Matrix i: keys kk*16 + 8 (i >> 1) .. +7, rows
        // rb*16 + 8 (i & 1) .. +7, transposed -> a0 (rows lo, keys lo), a1 (rows hi, keys lo),
        // a2 (rows lo, keys hi), a3 (rows hi, keys hi).
        uint32_t a[4];
        LdMatrixX4T(a, dSs + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * kLDS + rb * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int j = 0; j < DQN / 2; ++j) {
          // B = K (k = key, n = d). Matrix i: keys kk*16 + 8 (i & 1) .. +7, columns
          // (dn0 + 2 j + i / 2) * 8 .. +7, transposed -> b0, b1 of n-tile dn0 + 2 j, then of + 1.
          uint32_t b[4];
          LdMatrixX4T(b, Ks + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (dn0 + 2 * j + (lane >> 4)) * 8);
          Mma(acc[2 * j], a, b[0], b[1]);
          Mma(acc[2 * j + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < DQN; ++j)
        AtomicAddFrag<D>(dq, Hq, h, qrow0 + g, qrow0 + g + 8, (dn0 + j) * 8, acc[j], scale, r_stop, t);
    }

    if (has_next) {  // into the other buffer, last read in the previous iteration's phase 1
      CpAsyncWaitAll();  // this thread's chunks of tile rt + 32 have landed
      uint16_t* next = QO + (buf ^ 1) * kQBuf;
      Tile::Convert(next, stQ);
      Tile::Convert(next + kBwdRows * LD, stO);
      if (tid < kBwdRows) {
        st_next.Store(lse2s + (buf ^ 1) * kBwdRows, dls + (buf ^ 1) * kBwdRows, sss + (buf ^ 1) * kBwdRows, tid);
      }
    }
    __syncthreads();  // the next tile is in; everyone is done with dSs and this tile
  }

  // This block's share of dk, dv (the other query heads of the group add theirs).
#pragma unroll
  for (int dn = 0; dn < DN; ++dn) {
    AtomicAddFrag<D>(dk, Hkv, kvh, keyA, keyB, dn * 8, dKa[dn], scale, N, t);
    AtomicAddFrag<D>(dv, Hkv, kvh, keyA, keyB, dn * 8, dVa[dn], 1.0f, N, t);
  }
}

template <int D, typename Kv>
void LaunchForwardTc(float* out, uint16_t* out16, float* lse, const float* q, const Kv* k, const Kv* v,
                     const int32_t* cu, int S, int N, int Hq, int Hkv, cudaStream_t s) {
  const size_t smem = FwdTcSmemBytes<D, Kv>();
  AllowSmem(AttnFwdTcKernel<D, Kv>, smem);
  const dim3 grid(Hq, GridRows(N, kFwdRows));
  const float qscale = AttentionQScale(D);
  AttnFwdTcKernel<D, Kv><<<grid, kThreads, smem, s>>>(out, out16, lse, q, k, v, cu, S, N, Hq, Hkv, qscale);
  CheckCuda(cudaGetLastError(), "AttnFwdTcKernel launch");
}

template <int D>
void LaunchBackwardTc(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                      const float* q, const float* k, const float* v, const int32_t* cu, int S, int N, int Hq,
                      int Hkv, float* delta, int* row_start, cudaStream_t s) {
  AttentionBackwardPrepass(delta, row_start, dout, out, cu, S, N, Hq, D, s);

  const size_t smem = BwdTcSmemBytes<D>();
  AllowSmem(AttnBwdTcKernel<D>, smem);
  const dim3 grid(Hq, GridRows(N, kBwdKeys));
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  AttnBwdTcKernel<D><<<grid, kThreads, smem, s>>>(dq, dk, dv, dout, q, k, v, lse, delta, row_start, cu, S, N, Hq,
                                                  Hkv, scale);
  CheckCuda(cudaGetLastError(), "AttnBwdTcKernel launch");
}

}  // namespace

bool AttentionForwardTC(float* out, float* lse, const float* q, const float* k, const float* v,
                        const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s,
                        uint16_t* out_bf16) {
  if (D != 64 && D != 128) {
    AttentionForward(out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, s);
    return false;
  }
  if (N <= 0) return false;
  if (S <= 0) Fail("AttentionForwardTC: S must be positive when N > 0; S", S);
  CheckHeads(Hq, Hkv);
  if (D == 64) LaunchForwardTc<64, float>(out, out_bf16, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, s);
  else LaunchForwardTc<128, float>(out, out_bf16, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, s);
  return out_bf16 != nullptr;
}

void AttentionForwardTCBf16Kv(float* out, float* lse, const float* q, const uint16_t* k16, const uint16_t* v16,
                              const int32_t* cu_seqlens, int S, int N, int Hq, int Hkv, int D, cudaStream_t s,
                              uint16_t* out_bf16, const uint16_t* q_scaled16) {
  if (D != 64 && D != 128) Fail("AttentionForwardTCBf16Kv: head width must be 64 or 128; D", D);
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionForwardTCBf16Kv: S must be positive when N > 0; S", S);
  CheckHeads(Hq, Hkv);
  if (AttentionForwardWgmmaSupported(D)) {
    return AttentionForwardWgmma(out, lse, q, k16, v16, cu_seqlens, S, N, Hq, Hkv, D, s, out_bf16, q_scaled16);
  }
  if (q_scaled16) Fail("AttentionForwardTCBf16Kv: a pre-scaled bf16 q needs the wgmma forward; D", D);
  if (D == 64) LaunchForwardTc<64, uint16_t>(out, out_bf16, lse, q, k16, v16, cu_seqlens, S, N, Hq, Hkv, s);
  else LaunchForwardTc<128, uint16_t>(out, out_bf16, lse, q, k16, v16, cu_seqlens, S, N, Hq, Hkv, s);
}

void AttentionBackwardTC(float* dq, float* dk, float* dv, const float* dout, const float* out, const float* lse,
                         const float* q, const float* k, const float* v, const int32_t* cu_seqlens, int S, int N,
                         int Hq, int Hkv, int D, void* workspace, cudaStream_t s, bool wgmma) {
  if (D != 64 && D != 128) {
    return AttentionBackward(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, workspace, s);
  }
  if (N <= 0) return;
  if (S <= 0) Fail("AttentionBackwardTC: S must be positive when N > 0; S", S);
  CheckHeads(Hq, Hkv);
  if (wgmma && AttentionBackwardWgmmaSupported(D)) {
    return AttentionBackwardWgmma(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, D, workspace, s);
  }
  // dq, dk, dv are accumulated with atomics: zero them first ("overwrite" semantics of the op).
  CheckCuda(cudaMemsetAsync(dq, 0, static_cast<size_t>(N) * Hq * D * sizeof(float), s), "cudaMemsetAsync(dq)");
  CheckCuda(cudaMemsetAsync(dk, 0, static_cast<size_t>(N) * Hkv * D * sizeof(float), s), "cudaMemsetAsync(dk)");
  CheckCuda(cudaMemsetAsync(dv, 0, static_cast<size_t>(N) * Hkv * D * sizeof(float), s), "cudaMemsetAsync(dv)");
  float* delta = BackwardDelta(workspace);  // the layout of AttentionBackwardWorkspace(N, Hq)
  int* row_start = BackwardRowStart(workspace, N, Hq);
  if (D == 64) {
    return LaunchBackwardTc<64>(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, delta, row_start, s);
  }
  return LaunchBackwardTc<128>(dq, dk, dv, dout, out, lse, q, k, v, cu_seqlens, S, N, Hq, Hkv, delta, row_start, s);
}

}  // namespace aha::engine::cuda

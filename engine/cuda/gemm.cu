// cuBLAS products for row-major f32 buffers (gemm.h). cuBLAS is column-major: a row-major [R, C]
// buffer is the column-major [C, R] matrix, its transpose. So row-major out[M, N] = A' B' is computed
// as column-major out^T[N, M] = B'^T A'^T, i.e. cuBLAS gets the operands swapped:
//   NT: out^T = b (op T on b's buffer, ld K)  * a^T (op N on a's buffer, ld K)
//   NN: out^T = b^T (op N, ld N)              * a^T (op N, ld K)
//   TN: out^T = b^T (op N, ld N)              * a   (op T on a's buffer, ld M)
// The cuBLASLt path describes the same column-major problem: Lt's A is b's buffer (op_b), Lt's B is
// a's buffer (op_a), C = D = out, each layout being the matrix as stored (rows x cols, ld).
#include "engine/cuda/gemm.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "engine/cuda/kernels.h"

namespace aha::engine::cuda {

namespace {

// cuBLAS is opened on first use (dlopen), not linked: a process that never creates a CUDA backend
// (every CPU run, every CPU test) never maps its ~600 MB, and its 92 KB of static TLS, which glibc
// reserves in every thread's stack, stays out of processes that do not use it (with civetweb's
// 100 KB thread stacks that once broke the metrics endpoint; see common/metrics.h).
// A library opened by soname; a missing library or symbol aborts with a line naming it.
class SharedLibrary {
 public:
  explicit SharedLibrary(std::string name)
      : name_(std::move(name)), lib_(dlopen(name_.c_str(), RTLD_NOW | RTLD_LOCAL)) {
    if (!lib_) {
      std::fprintf(stderr, "aha: cannot load %s: %s\n", name_.c_str(), dlerror());
      std::abort();
    }
  }
  template <typename Fn>
  void Bind(Fn* out, const char* symbol) const {
    void* p = dlsym(lib_, symbol);
    if (!p) {
      std::fprintf(stderr, "aha: %s has no %s\n", name_.c_str(), symbol);
      std::abort();
    }
    *out = reinterpret_cast<Fn>(p);
  }

 private:
  std::string name_;
  void* lib_;
};

struct CublasApi {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSetStream_v2) set_stream;
  decltype(&cublasSetWorkspace_v2) set_workspace;
  decltype(&cublasSetMathMode) set_math_mode;
  decltype(&cublasSgemm_v2) sgemm;
  // The C entry point (cublas_api.h also declares C++ overloads of the name).
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*, void*,
                            cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  decltype(&cublasGetStatusString) status_string;
};

const CublasApi& Cublas() {
  static const CublasApi api = [] {
    const SharedLibrary lib("libcublas.so." + std::to_string(CUBLAS_VER_MAJOR));
    CublasApi a;
    lib.Bind(&a.create, "cublasCreate_v2");
    lib.Bind(&a.destroy, "cublasDestroy_v2");
    lib.Bind(&a.set_stream, "cublasSetStream_v2");
    lib.Bind(&a.set_workspace, "cublasSetWorkspace_v2");
    lib.Bind(&a.set_math_mode, "cublasSetMathMode");
    lib.Bind(&a.sgemm, "cublasSgemm_v2");
    lib.Bind(&a.gemm_ex, "cublasGemmEx");
    lib.Bind(&a.status_string, "cublasGetStatusString");
    return a;
  }();
  return api;
}

// cuBLASLt, opened the same way (libcublas itself depends on it, so this maps nothing new).
struct CublasLtApi {
  decltype(&cublasLtCreate) create;
  decltype(&cublasLtDestroy) destroy;
  decltype(&cublasLtMatmul) matmul;
  decltype(&cublasLtMatmulDescCreate) desc_create;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set;
  decltype(&cublasLtMatrixLayoutCreate) layout_create;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy;
  decltype(&cublasLtMatrixLayoutSetAttribute) layout_set;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
  decltype(&cublasLtMatmulAlgoCheck) algo_check;
  decltype(&cublasLtGetStatusString) status_string;
};

const CublasLtApi& CublasLt() {
  static const CublasLtApi api = [] {
    const SharedLibrary lib("libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR));
    CublasLtApi a;
    lib.Bind(&a.create, "cublasLtCreate");
    lib.Bind(&a.destroy, "cublasLtDestroy");
    lib.Bind(&a.matmul, "cublasLtMatmul");
    lib.Bind(&a.desc_create, "cublasLtMatmulDescCreate");
    lib.Bind(&a.desc_destroy, "cublasLtMatmulDescDestroy");
    lib.Bind(&a.desc_set, "cublasLtMatmulDescSetAttribute");
    lib.Bind(&a.layout_create, "cublasLtMatrixLayoutCreate");
    lib.Bind(&a.layout_destroy, "cublasLtMatrixLayoutDestroy");
    lib.Bind(&a.layout_set, "cublasLtMatrixLayoutSetAttribute");
    lib.Bind(&a.pref_create, "cublasLtMatmulPreferenceCreate");
    lib.Bind(&a.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    lib.Bind(&a.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    lib.Bind(&a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    lib.Bind(&a.algo_check, "cublasLtMatmulAlgoCheck");
    lib.Bind(&a.status_string, "cublasLtGetStatusString");
    return a;
  }();
  return api;
}

void CheckLt(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "aha: cuBLASLt %s failed: %s\n", what, CublasLt().status_string(st));
    std::abort();
  }
}

void CheckCublas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "aha: cuBLAS %s failed: %s\n", what, Cublas().status_string(st));
    std::abort();
  }
}

void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "aha: CUDA %s failed: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}

// A device buffer that only grows.
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  uint64_t* generation = nullptr;
  void* Get(size_t need) {
    if (need > bytes) {
      // At least a quarter more: cast sizes follow the batch, which varies by a few rows per
      // step, and each growth is a device-wide cudaFree.
      need = std::max(need, bytes + bytes / 4);
      ++*generation;
      if (p) CheckCuda(cudaFree(p), "free scratch");
      CheckCuda(cudaMalloc(&p, need), "allocate gemm scratch");
      bytes = need;
    }
    return p;
  }
  ~Scratch() {
    if (p) cudaFree(p);
  }
};

struct WeightRange {
  const float* base = nullptr;
  size_t n = 0;
  uint16_t* bf16 = nullptr;
  size_t fresh = 0;  // [base, base + fresh) had its copy written with its values (CopyWritten)
};

// An explicit workspace keeps cuBLAS and cuBLASLt from allocating inside a captured CUDA graph.
// 32 MiB is what cuBLAS recommends on Hopper.
constexpr size_t kWorkspace = size_t{32} << 20;

// The alignment an algorithm may assume for a matrix: the largest power of two, up to 256 (the
// preference's default), dividing both its address and its leading dimension in bytes (the
// algorithm's MIN_ALIGNMENT capability covers both). Odd shapes and offset pointers (a weight's
// sub-range, a column block of the output) get the algorithms that can read them.
uint32_t Alignment(const void* p, int64_t ld_bytes) {
  const uint64_t x = reinterpret_cast<uintptr_t>(p) | static_cast<uint64_t>(ld_bytes) | 256u;
  return static_cast<uint32_t>(x & (~x + 1));
}

// Sizes above 1024 rounded up to 4 steps per octave (1025 -> 1280, 16000 -> 16384): the token
// count of a training micro-batch or a prefill changes every step, and one timed choice per bucket
// keeps tuning to a handful of problems instead of one per step.
int64_t Bucket(int64_t n) {
  if (n <= 1024) return n;
  const int64_t step = int64_t{1} << (61 - __builtin_clzll(static_cast<unsigned long long>(n)));
  return (n + step - 1) / step * step;
}

// One exact problem: its descriptors (created once, host only) and its algorithm.
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool have_algo = false;
  bool tuned = false;        // algo is a timed winner (false: the heuristic's first, chosen while capturing)
  bool unsupported = false;  // no cuBLASLt algorithm: cublasGemmEx runs it
};

// A bucket's choice, shared by the exact problems that fall into it.
struct LtChoice {
  cublasLtMatmulAlgo_t algo{};
  bool tuned = false;
};

// (op_b, op_a, m, n, k, ldb, lda, ldo, beta != 0, alignment of b, a, out, out is bf16, K parts).
using LtKey = std::array<int64_t, 14>;
// (op_b, op_a, Bucket(m), Bucket(n), Bucket(k), beta != 0, alignment of b, a, out, out is bf16, K parts).
using LtBucketKey = std::array<int64_t, 11>;

// A product's output: f32, or bf16 (cuBLAS rounds the f32 accumulators in its epilogue) standing
// for the f32 range `alias` (what held casts are checked against).
struct Out {
  void* p;
  bool bf16;
  const float* alias;
  size_t elem() const { return bf16 ? sizeof(uint16_t) : sizeof(float); }
  cudaDataType type() const { return bf16 ? CUDA_R_16BF : CUDA_R_32F; }
};

// Exact plans kept at most; past it they are dropped (buckets keep their choices, so a dropped
// plan costs descriptor creation and one cublasLtMatmulAlgoCheck, not a new tuning).
constexpr size_t kMaxPlans = 4096;
constexpr int kCandidates = 8;

}  // namespace

struct Gemm::Impl {
  cudaStream_t stream;
  GemmPrecision precision;
  GemmLibrary library = GemmLibrary::kCublasLt;
  cublasHandle_t handle = nullptr;
  cublasLtHandle_t lt = nullptr;
  std::map<LtKey, LtPlan> plans;
  std::map<LtBucketKey, LtChoice> choices;
  int tuned_problems = 0;
  void* workspace = nullptr;
  uint64_t generation = 0;
  Scratch scratch_a{nullptr, 0, &generation}, scratch_b{nullptr, 0, &generation};
  // What each scratch holds: the bf16 cast of [p, p + count). A product whose operand is the
  // same range reuses it instead of casting again: q/k/v and gate/up read one normed input, and a
  // linear's backward reads dout twice (dx and dw). The owner calls ForgetCasts() whenever memory
  // may have changed outside these products (CudaBackend: after every other op).
  struct Held {
    const float* p = nullptr;
    size_t count = 0;
  } held_a, held_b;
  bool reuse = false;  // set_cast_reuse: only the owner knows no other kernel wrote in between
  // AdoptCast: a bf16 copy some producer kernel wrote beside its f32 output (not in a scratch).
  struct Adopted {
    const float* p = nullptr;
    size_t count = 0;
    const uint16_t* bf16 = nullptr;
  } adopted;
  uint64_t casts = 0;
  uint64_t adopted_reads = 0;
  std::vector<WeightRange> weights;

  // The bf16 operand for `p` (rows * cols elements): a registered weight's cached copy, the
  // scratch's cast when it already holds p, or a new cast into scratch.
  const uint16_t* Bf16(const float* p, size_t count, Scratch& scratch, Held& held) {
    for (const WeightRange& w : weights)
      if (p >= w.base && p + count <= w.base + w.n) return w.bf16 + (p - w.base);
    if (reuse && adopted.p == p && adopted.count == count) {
      ++adopted_reads;
      return adopted.bf16;
    }
    if (reuse && held.p == p && held.count == count && scratch.bytes >= count * sizeof(uint16_t))
      return static_cast<const uint16_t*>(scratch.p);
    auto* out = static_cast<uint16_t*>(scratch.Get(count * sizeof(uint16_t)));
    CastF32ToBF16(out, p, count, stream);
    ++casts;
    held = {p, count};
    return out;
  }

  // A product that writes [out, out + n) makes a held cast of that range stale.
  static void Overwritten(Held& held, const float* out, size_t n) {
    if (held.p && out < held.p + held.count && held.p < out + n) held = {};
  }
  // Every held range a product's output [out, out + n) overlaps is stale afterwards.
  void Wrote(const float* out, size_t n) {
    Overwritten(held_a, out, n);
    Overwritten(held_b, out, n);
    if (adopted.p && out < adopted.p + adopted.count && adopted.p < out + n) adopted = {};
  }

  bool Capturing() const {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    CheckCuda(cudaStreamIsCapturing(stream, &st), "query stream capture");
    return st != cudaStreamCaptureStatusNone;
  }

  // parts > 1: a batch of `parts` products, part j reading the j-th k columns of both operands
  // (their stored rows hold the whole K, ld apart) and writing the j-th m x n block of out.
  LtPlan NewPlan(cublasOperation_t op_b, cublasOperation_t op_a, int m, int n, int k, int ldb, int lda, int ldo,
                 cudaDataType out_type, int parts) {
    LtPlan p;
    CheckLt(CublasLt().desc_create(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
    const int32_t ta = op_b, tb = op_a;
    CheckLt(CublasLt().desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "set transa");
    CheckLt(CublasLt().desc_set(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "set transb");
    // Each layout is the matrix as stored: op(A) is m x k, op(B) is k x n, C is m x n.
    const bool tra = op_b != CUBLAS_OP_N, trb = op_a != CUBLAS_OP_N;
    CheckLt(CublasLt().layout_create(&p.la, CUDA_R_16BF, tra ? k : m, tra ? m : k, ldb), "layout a");
    CheckLt(CublasLt().layout_create(&p.lb, CUDA_R_16BF, trb ? n : k, trb ? k : n, lda), "layout b");
    CheckLt(CublasLt().layout_create(&p.lc, out_type, m, n, ldo), "layout c");
    if (parts > 1) {
      const int32_t count = parts;
      const int64_t step_k = k, step_out = int64_t{ldo} * n;
      for (cublasLtMatrixLayout_t l : {p.la, p.lb, p.lc})
        CheckLt(CublasLt().layout_set(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)), "batch count");
      CheckLt(CublasLt().layout_set(p.la, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &step_k, sizeof(step_k)),
              "batch offset a");
      CheckLt(CublasLt().layout_set(p.lb, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &step_k, sizeof(step_k)),
              "batch offset b");
      CheckLt(CublasLt().layout_set(p.lc, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &step_out, sizeof(step_out)),
              "batch offset c");
    }
    return p;
  }

  static void DestroyPlan(LtPlan& p) {
    CublasLt().layout_destroy(p.lc);
    CublasLt().layout_destroy(p.lb);
    CublasLt().layout_destroy(p.la);
    CublasLt().desc_destroy(p.desc);
  }

  // Whether `algo` runs this exact problem within the workspace.
  bool Fits(const LtPlan& p, const cublasLtMatmulAlgo_t& algo) const {
    cublasLtMatmulHeuristicResult_t r{};
    return CublasLt().algo_check(lt, p.desc, p.la, p.lb, p.lc, p.lc, &algo, &r) == CUBLAS_STATUS_SUCCESS &&
           r.workspaceSize <= kWorkspace;
  }

  cublasStatus_t Matmul(const LtPlan& p, const cublasLtMatmulAlgo_t& algo, const void* A, const void* B, void* C,
                        float alpha, float beta) {
    return CublasLt().matmul(lt, p.desc, &alpha, A, p.la, B, p.lb, &beta, C, p.lc, C, p.lc, &algo, workspace,
                             kWorkspace, stream);
  }

  // Gives plan p an algorithm: the bucket's timed winner if it fits; else the heuristic's candidates,
  // timed here (not while capturing: then its first). False if cuBLASLt has none for the problem.
  bool Choose(LtPlan& p, const LtBucketKey& bkey, uint32_t al_a, uint32_t al_b, uint32_t al_c, int m, int n,
              int ldo, const void* A, const void* B, const Out& out, float alpha, float beta) {
    const bool capturing = Capturing();
    auto c = choices.find(bkey);
    if (c != choices.end() && (c->second.tuned || capturing) && Fits(p, c->second.algo)) {
      p.algo = c->second.algo;
      p.tuned = c->second.tuned;
      p.have_algo = true;
      return true;
    }
    cublasLtMatmulPreference_t pref = nullptr;
    CheckLt(CublasLt().pref_create(&pref), "preference");
    const uint64_t ws = kWorkspace;
    CheckLt(CublasLt().pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)), "pref workspace");
    CheckLt(CublasLt().pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)), "pref align a");
    CheckLt(CublasLt().pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)), "pref align b");
    CheckLt(CublasLt().pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)), "pref align c");
    CheckLt(CublasLt().pref_set(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)), "pref align d");
    cublasLtMatmulHeuristicResult_t found[kCandidates];
    int count = 0;
    const cublasStatus_t st =
        CublasLt().heuristic(lt, p.desc, p.la, p.lb, p.lc, p.lc, pref, kCandidates, found, &count);
    CublasLt().pref_destroy(pref);
    std::vector<cublasLtMatmulAlgo_t> cand;
    if (st == CUBLAS_STATUS_SUCCESS)
      for (int i = 0; i < count; ++i)
        if (found[i].state == CUBLAS_STATUS_SUCCESS && found[i].workspaceSize <= kWorkspace)
          cand.push_back(found[i].algo);
    if (cand.empty()) return false;
    if (capturing || cand.size() == 1) {
      p.algo = cand[0];
      p.tuned = !capturing;
    } else {
      const int best = Fastest(p, cand, m, n, ldo, A, B, out, alpha, beta);
      if (best < 0) return false;
      p.algo = cand[best];
      p.tuned = true;
      ++tuned_problems;
    }
    p.have_algo = true;
    if (c == choices.end() || (p.tuned && !c->second.tuned)) choices[bkey] = {p.algo, p.tuned};
    return true;
  }

  // Times each candidate once (after one untimed run, which loads its kernel) and returns the
  // fastest's index (-1 if none ran). With beta == 0 the runs write `out`, which the real product
  // overwrites next; with beta != 0 they write a scratch matrix of out's shape, so that out itself
  // is accumulated into exactly once (if that scratch cannot be allocated, candidate 0 is taken
  // untimed).
  int Fastest(const LtPlan& p, const std::vector<cublasLtMatmulAlgo_t>& cand, int m, int n, int ldo, const void* A,
              const void* B, const Out& out, float alpha, float beta) {
    void* target = out.p;
    void* temp = nullptr;
    if (beta != 0.0f) {
      const size_t bytes = out.elem() * (static_cast<size_t>(ldo) * (n - 1) + m);
      if (cudaMalloc(&temp, bytes) != cudaSuccess) {
        cudaGetLastError();  // no room to time candidates: the heuristic's first choice it is
        return 0;
      }
      CheckCuda(cudaMemsetAsync(temp, 0, bytes, stream), "clear gemm tuning output");
      target = temp;
    }
    std::vector<cudaEvent_t> ev(2 * cand.size());
    for (cudaEvent_t& e : ev) CheckCuda(cudaEventCreate(&e), "create event");
    std::vector<bool> ran(cand.size());
    for (size_t i = 0; i < cand.size(); ++i)
      ran[i] = Matmul(p, cand[i], A, B, target, alpha, beta) == CUBLAS_STATUS_SUCCESS;
    for (size_t i = 0; i < cand.size(); ++i) {
      if (!ran[i]) continue;
      CheckCuda(cudaEventRecord(ev[2 * i], stream), "record event");
      ran[i] = Matmul(p, cand[i], A, B, target, alpha, beta) == CUBLAS_STATUS_SUCCESS;
      CheckCuda(cudaEventRecord(ev[2 * i + 1], stream), "record event");
    }
    CheckCuda(cudaStreamSynchronize(stream), "synchronize gemm tuning");
    int best = -1;
    float best_ms = 0.0f;
    for (size_t i = 0; i < cand.size(); ++i) {
      float ms = 0.0f;
      if (!ran[i] || cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]) != cudaSuccess) continue;
      if (best < 0 || ms < best_ms) best = static_cast<int>(i), best_ms = ms;
    }
    for (cudaEvent_t e : ev) cudaEventDestroy(e);
    if (temp) CheckCuda(cudaFree(temp), "free gemm tuning output");
    return best;
  }

  // out = alpha * op_b(b16) op_a(a16) + beta * out through cublasLtMatmul (column-major, as for
  // cublasGemmEx). False if cuBLASLt has no algorithm for it (the caller runs cublasGemmEx).
  bool RunLt(cublasOperation_t op_b, cublasOperation_t op_a, int m, int n, int k, const uint16_t* b16, int ldb,
             const uint16_t* a16, int lda, const Out& out, int ldo, float alpha, float beta, int parts) {
    // A part's operands start k elements after the one before: that offset's alignment counts too.
    const int64_t step = parts > 1 ? int64_t{k} * 2 : 0;
    const uint32_t al_a = Alignment(b16, int64_t{ldb} * 2 | step), al_b = Alignment(a16, int64_t{lda} * 2 | step),
                   al_c = Alignment(out.p, static_cast<int64_t>(ldo * out.elem()));
    const int64_t accumulate = beta != 0.0f;
    const LtKey key{op_b, op_a, m, n, k, ldb, lda, ldo, accumulate, al_a, al_b, al_c, out.bf16, parts};
    auto it = plans.find(key);
    if (it == plans.end()) {
      if (plans.size() >= kMaxPlans) {
        for (auto& [unused, p] : plans) DestroyPlan(p);
        plans.clear();
      }
      it = plans.emplace(key, NewPlan(op_b, op_a, m, n, k, ldb, lda, ldo, out.type(), parts)).first;
    }
    LtPlan& p = it->second;
    if (p.unsupported) return false;
    if (!p.have_algo || (!p.tuned && !Capturing())) {
      const LtBucketKey bkey{op_b,     op_a, Bucket(m), Bucket(n), Bucket(k), accumulate, al_a, al_b,
                             al_c,     out.bf16, parts};
      if (!Choose(p, bkey, al_a, al_b, al_c, m, n, ldo, b16, a16, out, alpha, beta)) {
        std::fprintf(stderr, "aha: cuBLASLt has no algorithm for a %dx%dx%d bf16 product; using cublasGemmEx\n", m,
                     n, k);
        p.unsupported = true;
        return false;
      }
    }
    CheckLt(Matmul(p, p.algo, b16, a16, out.p, alpha, beta), "matmul bf16");
    return true;
  }

  // parts > 1 (NT only, beta 0): K split into `parts` runs of k, part j's product into the j-th
  // m x n block of out (see NewPlan).
  void Run(cublasOperation_t op_b, cublasOperation_t op_a, int m, int n, int k, const float* b, size_t b_count,
           int ldb, const float* a, size_t a_count, int lda, const Out& out, int ldo, float alpha, float beta,
           int parts = 1) {
    if (m == 0 || n == 0) return;
    const size_t out_count = static_cast<size_t>(m) * n * parts;
    if (k == 0) {
      // A zero-length product: out = beta * out.
      if (beta == 0.0f) CheckCuda(cudaMemsetAsync(out.p, 0, out.elem() * out_count, stream), "memset");
      else if (beta != 1.0f) Scale(static_cast<float*>(out.p), beta, out_count, stream);  // f32 only (NTBf16: beta 0)
      Wrote(out.alias, out_count);
      return;
    }
    if (precision == GemmPrecision::kF32) {
      if (out.bf16) {
        std::fprintf(stderr, "aha: Gemm: a bf16 output needs bf16 products\n");
        std::abort();
      }
      for (int j = 0; j < parts; ++j)
        CheckCublas(Cublas().sgemm(handle, op_b, op_a, m, n, k, &alpha, b + static_cast<size_t>(j) * k, ldb,
                                   a + static_cast<size_t>(j) * k, lda, &beta,
                                   static_cast<float*>(out.p) + static_cast<size_t>(j) * ldo * n, ldo),
                    "sgemm");
      Wrote(out.alias, out_count);
      return;
    }
    const uint16_t* b16 = Bf16(b, b_count, scratch_b, held_b);
    const uint16_t* a16 = Bf16(a, a_count, scratch_a, held_a);
    if (library != GemmLibrary::kCublasLt ||
        !RunLt(op_b, op_a, m, n, k, b16, ldb, a16, lda, out, ldo, alpha, beta, parts))
      for (int j = 0; j < parts; ++j)
        CheckCublas(Cublas().gemm_ex(handle, op_b, op_a, m, n, k, &alpha, b16 + static_cast<size_t>(j) * k,
                                     CUDA_R_16BF, ldb, a16 + static_cast<size_t>(j) * k, CUDA_R_16BF, lda, &beta,
                                     static_cast<char*>(out.p) + static_cast<size_t>(j) * ldo * n * out.elem(),
                                     out.type(), ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                    "gemm bf16");
    Wrote(out.alias, out_count);
  }
};

Gemm::Gemm(cudaStream_t stream, GemmPrecision precision) : impl_(new Impl) {
  impl_->stream = stream;
  impl_->precision = precision;
  CheckCublas(Cublas().create(&impl_->handle), "create");
  CheckCublas(Cublas().set_stream(impl_->handle, stream), "set stream");
  CheckLt(CublasLt().create(&impl_->lt), "create");
  if (const char* env = std::getenv("AHA_GEMM")) {
    if (std::strcmp(env, "gemmex") == 0) impl_->library = GemmLibrary::kCublasGemmEx;
    else if (std::strcmp(env, "lt") != 0)
      std::fprintf(stderr, "aha: AHA_GEMM=%s is neither lt nor gemmex; using lt\n", env);
  }
  CheckCuda(cudaMalloc(&impl_->workspace, kWorkspace), "allocate cuBLAS workspace");
  CheckCublas(Cublas().set_workspace(impl_->handle, impl_->workspace, kWorkspace), "set workspace");
  // f32 products stay f32: no TF32 down-conversion.
  CheckCublas(Cublas().set_math_mode(impl_->handle, CUBLAS_PEDANTIC_MATH), "set math mode");
}

Gemm::~Gemm() {
  for (WeightRange& w : impl_->weights) cudaFree(w.bf16);
  for (auto& [unused, p] : impl_->plans) Impl::DestroyPlan(p);
  CublasLt().destroy(impl_->lt);
  Cublas().destroy(impl_->handle);
  cudaFree(impl_->workspace);
}

GemmPrecision Gemm::precision() const { return impl_->precision; }
void Gemm::set_precision(GemmPrecision p) {
  impl_->precision = p;
  ForgetCasts();
}
GemmLibrary Gemm::library() const { return impl_->library; }
void Gemm::set_library(GemmLibrary library) { impl_->library = library; }
int Gemm::tuned_problems() const { return impl_->tuned_problems; }

const char* GemmLibraryName(GemmLibrary library) {
  return library == GemmLibrary::kCublasLt ? "cublaslt" : "gemmex";
}

void Gemm::ForgetCasts() {
  impl_->held_a = impl_->held_b = {};
  impl_->adopted = {};
}
void Gemm::AdoptCast(const float* f32, size_t count, const uint16_t* bf16) { impl_->adopted = {f32, count, bf16}; }
uint64_t Gemm::casts_launched() const { return impl_->casts; }
uint64_t Gemm::adopted_reads() const { return impl_->adopted_reads; }
void Gemm::set_cast_reuse(bool on) { impl_->reuse = on; }

void Gemm::NT(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta) {
  impl_->Run(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, b, static_cast<size_t>(N) * K, K, a, static_cast<size_t>(M) * K, K,
             Out{out, false, out}, N, alpha, beta);
}

void Gemm::NN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta) {
  impl_->Run(CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, b, static_cast<size_t>(K) * N, N, a, static_cast<size_t>(M) * K, K,
             Out{out, false, out}, N, alpha, beta);
}

void Gemm::TN(float* out, const float* a, const float* b, int M, int N, int K, float alpha, float beta) {
  impl_->Run(CUBLAS_OP_N, CUBLAS_OP_T, N, M, K, b, static_cast<size_t>(K) * N, N, a, static_cast<size_t>(K) * M, M,
             Out{out, false, out}, N, alpha, beta);
}

void Gemm::NTSplitK(float* parts, const float* a, const float* b, int M, int N, int K, int S) {
  if (S < 1 || K % S != 0) {
    std::fprintf(stderr, "aha: Gemm::NTSplitK: K = %d is not %d equal parts\n", K, S);
    std::abort();
  }
  impl_->Run(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K / S, b, static_cast<size_t>(N) * K, K, a, static_cast<size_t>(M) * K,
             K, Out{parts, false, parts}, N, 1.0f, 0.0f, S);
}

void Gemm::NTBf16(uint16_t* out, const float* alias, const float* a, const float* b, int M, int N, int K) {
  impl_->Run(CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, b, static_cast<size_t>(N) * K, K, a, static_cast<size_t>(M) * K, K,
             Out{out, true, alias}, N, 1.0f, 0.0f);
}

void Gemm::NNBf16(uint16_t* out, const float* alias, const float* a, const float* b, int M, int N, int K) {
  impl_->Run(CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, b, static_cast<size_t>(K) * N, N, a, static_cast<size_t>(M) * K, K,
             Out{out, true, alias}, N, 1.0f, 0.0f);
}

void Gemm::RegisterWeights(const float* base, size_t n) {
  WeightRange w{base, n, nullptr};
  CheckCuda(cudaMalloc(&w.bf16, n * sizeof(uint16_t)), "allocate bf16 weights");
  impl_->weights.push_back(w);
}

void Gemm::UnregisterWeights(const float* base) {
  auto& ws = impl_->weights;
  for (size_t i = 0; i < ws.size(); ++i)
    if (ws[i].base == base) {
      CheckCuda(cudaStreamSynchronize(impl_->stream), "synchronize");
      cudaFree(ws[i].bf16);
      ws.erase(ws.begin() + static_cast<long>(i));
      return;
    }
}

void Gemm::WeightsChanged(const float* base) {
  for (WeightRange& w : impl_->weights)
    if (w.base == base) {
      if (w.fresh != w.n) CastF32ToBF16(w.bf16, w.base, w.n, impl_->stream);
      w.fresh = 0;
    }
}

uint16_t* Gemm::Bf16CopyOf(const float* p, size_t n) {
  if (impl_->precision != GemmPrecision::kBF16) return nullptr;
  for (WeightRange& w : impl_->weights)
    if (p >= w.base && p + n <= w.base + w.n) return w.bf16 + (p - w.base);
  return nullptr;
}

void Gemm::CopyWritten(const float* p, size_t n) {
  for (WeightRange& w : impl_->weights)
    if (p >= w.base && p + n <= w.base + w.n) {
      // Only an unbroken run from the start counts; anything else leaves the cast to WeightsChanged.
      w.fresh = static_cast<size_t>(p - w.base) == w.fresh ? w.fresh + n : w.n + 1;
      return;
    }
}

uint64_t Gemm::scratch_generation() const { return impl_->generation; }

uint16_t* Gemm::Bf16Copy(const float* base) {
  for (WeightRange& w : impl_->weights)
    if (w.base == base) return w.bf16;
  return nullptr;
}

}  // namespace aha::engine::cuda

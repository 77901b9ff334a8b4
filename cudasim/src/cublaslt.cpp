// libcublasLt.so of the simulated device: the part of cuBLASLt that src/runtime/blas.rs uses, with cuBLASLt's
// semantics for what it sets: column-major layouts with their leading dimensions, TRANSA/TRANSB, strided batches
// (per-layout count and stride), alpha and beta (C is not read when beta is 0), the BIAS epilogue (a vector over
// D's rows, of D's type, added after alpha and beta), f32 or bf16 storage and f32 compute. A GEMM is stream work
// like a kernel: queued (or captured) through the driver, which checks every operand's extent against the live
// allocations. The minimum alignments the program declared when it chose the algorithm are checked against the
// pointers of every call made with it, as a GPU algorithm relying on them would fault otherwise.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

extern "C" int cudasim_enqueue_host_work(void* stream, const char* what, int (*run)(void*, char*, size_t), void* arg,
                                         void (*drop)(void*), const uint64_t* ranges, int range_count);

namespace {
typedef int Status;
enum : Status { OK = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, EXECUTION_FAILED = 13, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68 };
enum { EPILOGUE_DEFAULT = 1, EPILOGUE_BIAS = 4 };

struct Handle {
    int magic = 0x6c74;
};
struct Desc {
    int transa = 0, transb = 0, epilogue = EPILOGUE_DEFAULT;
    uint64_t bias = 0;
    int bias_type = -1;  // -1: D's type
};
struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int batch = 1;
    int64_t stride = 0;
};
struct Pref {
    uint64_t workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // cuBLASLt's defaults
};
// cublasLtMatmulAlgo_t is 8 opaque u64s; ours records the alignments the algorithm may rely on.
struct Algo {
    uint64_t magic;
    uint64_t align[4];
    uint64_t unused[3];
};
struct HeuristicResult {
    Algo algo;
    size_t workspace;
    Status state;
    float waves;
    int reserved[4];
};
constexpr uint64_t ALGO_MAGIC = 0x63756461'73696d31ull;

size_t type_size(int t) { return t == R_32F ? 4 : 2; }

float load(int type, const void* p, int64_t i) {
    if (type == R_32F) return static_cast<const float*>(p)[i];
    const uint32_t u = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
void store(int type, void* p, int64_t i, float v) {
    if (type == R_32F) {
        static_cast<float*>(p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        static_cast<uint16_t*>(p)[i] = 0x7fff;
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    static_cast<uint16_t*>(p)[i] = uint16_t(u >> 16);
}

// Bytes of a column-major layout, all batches: the extent the driver checks.
uint64_t extent(const Layout& l) {
    if (!l.rows || !l.cols) return 0;
    const uint64_t one = (uint64_t(l.cols - 1) * l.ld + l.rows) * type_size(l.type);
    return one + uint64_t(l.batch - 1) * uint64_t(l.stride) * type_size(l.type);
}

struct Gemm {
    Desc d;
    Layout a, b, c, dl;
    float alpha, beta;
    const void *A, *B, *C;
    void* D;
    int64_t m, n, k;
};

int run_gemm(void* arg, char*, size_t) {
    const Gemm& g = *static_cast<const Gemm*>(arg);
    const int batches = g.dl.batch;
    std::vector<float> arow(size_t(g.m * g.k)), bcol(size_t(g.n * g.k));
    const int bias_type = g.d.bias_type < 0 ? g.dl.type : g.d.bias_type;
    for (int bt = 0; bt < batches; ++bt) {
        // A layout of batch count 1 is shared by every batch.
        const int64_t oa = g.a.batch > 1 ? bt * g.a.stride : 0, ob = g.b.batch > 1 ? bt * g.b.stride : 0;
        const int64_t oc = g.c.batch > 1 ? bt * g.c.stride : 0, od = bt * g.dl.stride;
        for (int64_t i = 0; i < g.m; ++i)
            for (int64_t p = 0; p < g.k; ++p)
                arow[size_t(i * g.k + p)] = g.d.transa ? load(g.a.type, g.A, oa + i * g.a.ld + p) : load(g.a.type, g.A, oa + p * g.a.ld + i);
        for (int64_t j = 0; j < g.n; ++j)
            for (int64_t p = 0; p < g.k; ++p)
                bcol[size_t(j * g.k + p)] = g.d.transb ? load(g.b.type, g.B, ob + p * g.b.ld + j) : load(g.b.type, g.B, ob + j * g.b.ld + p);
        for (int64_t j = 0; j < g.n; ++j) {
            const float* bj = &bcol[size_t(j * g.k)];
            for (int64_t i = 0; i < g.m; ++i) {
                const float* ai = &arow[size_t(i * g.k)];
                // f32 products summed in 8 f32 partial sums (as a GPU's f32 accumulators hold partial tiles), then
                // combined in double.
                float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int64_t p = 0;
                for (; p + 8 <= g.k; p += 8)
                    for (int q = 0; q < 8; ++q) part[q] += ai[p + q] * bj[p + q];
                double sum = 0;
                for (; p < g.k; ++p) sum += double(ai[p]) * bj[p];
                for (int q = 0; q < 8; ++q) sum += part[q];
                double v = double(g.alpha) * sum;
                if (g.beta != 0.0f) v += double(g.beta) * load(g.c.type, g.C, oc + j * g.c.ld + i);
                if (g.d.epilogue == EPILOGUE_BIAS) v += load(bias_type, reinterpret_cast<const void*>(g.d.bias), i);
                store(g.dl.type, g.D, od + j * g.dl.ld + i, float(v));
            }
        }
    }
    return 0;
}
}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API Status cublasLtCreate(Handle** h) {
    *h = new Handle();
    return OK;
}
API Status cublasLtDestroy(Handle* h) {
    delete h;
    return OK;
}
API size_t cublasLtGetVersion() { return 130000; }
API Status cublasLtMatmulDescCreate(Desc** d, int compute, int scale) {
    if (compute != COMPUTE_32F || scale != R_32F) {
        fprintf(stderr, "cudasim cuBLASLt: only CUBLAS_COMPUTE_32F with f32 scale is simulated (got %d, %d)\n", compute, scale);
        return NOT_SUPPORTED;
    }
    *d = new Desc();
    return OK;
}
API Status cublasLtMatmulDescDestroy(Desc* d) {
    delete d;
    return OK;
}
API Status cublasLtMatmulDescSetAttribute(Desc* d, int attribute, const void* value, size_t bytes) {
    auto get = [&](void* out, size_t n) {
        if (bytes != n) return INVALID_VALUE;
        memcpy(out, value, n);
        return OK;
    };
    switch (attribute) {
        case 3: return get(&d->transa, 4);
        case 4: return get(&d->transb, 4);
        case 7: {
            Status s = get(&d->epilogue, 4);
            if (s == OK && d->epilogue != EPILOGUE_DEFAULT && d->epilogue != EPILOGUE_BIAS) return NOT_SUPPORTED;
            return s;
        }
        case 8: return get(&d->bias, 8);
        case 26: return get(&d->bias_type, 4);
        default:
            fprintf(stderr, "cudasim cuBLASLt: matmul descriptor attribute %d is not simulated\n", attribute);
            return NOT_SUPPORTED;
    }
}
API Status cublasLtMatrixLayoutCreate(Layout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != R_32F && type != R_16BF) return NOT_SUPPORTED;
    if (ld < int64_t(rows) || ld < 1) return INVALID_VALUE;
    *l = new Layout{type, rows, cols, ld};
    return OK;
}
API Status cublasLtMatrixLayoutDestroy(Layout* l) {
    delete l;
    return OK;
}
API Status cublasLtMatrixLayoutSetAttribute(Layout* l, int attribute, const void* value, size_t bytes) {
    if (attribute == 5 && bytes == 4) {
        memcpy(&l->batch, value, 4);
        return l->batch >= 1 ? OK : INVALID_VALUE;
    }
    if (attribute == 6 && bytes == 8) {
        memcpy(&l->stride, value, 8);
        return OK;
    }
    fprintf(stderr, "cudasim cuBLASLt: matrix layout attribute %d is not simulated\n", attribute);
    return NOT_SUPPORTED;
}
API Status cublasLtMatmulPreferenceCreate(Pref** p) {
    *p = new Pref();
    return OK;
}
API Status cublasLtMatmulPreferenceDestroy(Pref* p) {
    delete p;
    return OK;
}
API Status cublasLtMatmulPreferenceSetAttribute(Pref* p, int attribute, const void* value, size_t bytes) {
    if (attribute == 1 && bytes == 8) {
        memcpy(&p->workspace, value, 8);
        return OK;
    }
    if (attribute >= 5 && attribute <= 8 && bytes == 4) {
        memcpy(&p->align[attribute - 5], value, 4);
        return OK;
    }
    fprintf(stderr, "cudasim cuBLASLt: preference attribute %d is not simulated\n", attribute);
    return NOT_SUPPORTED;
}

namespace {
// The shape the descriptor and layouts describe: D[m, n] = op(A)[m, k] op(B)[k, n]; false if inconsistent.
bool shape_of(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl, int64_t* m, int64_t* n,
              int64_t* k) {
    *m = int64_t(d.transa ? a.cols : a.rows);
    *k = int64_t(d.transa ? a.rows : a.cols);
    const int64_t kb = int64_t(d.transb ? b.cols : b.rows);
    *n = int64_t(d.transb ? b.rows : b.cols);
    if (*k != kb || int64_t(dl.rows) != *m || int64_t(dl.cols) != *n || c.rows != dl.rows || c.cols != dl.cols) return false;
    for (const Layout* l : {&a, &b, &c})
        if (l->batch != 1 && l->batch != dl.batch) return false;
    return true;
}
}  // namespace

API Status cublasLtMatmulAlgoGetHeuristic(Handle*, Desc* d, Layout* a, Layout* b, Layout* c, Layout* dl, Pref* p,
                                          int requested, HeuristicResult* results, int* count) {
    int64_t m, n, k;
    *count = 0;
    if (requested < 1) return INVALID_VALUE;
    if (!shape_of(*d, *a, *b, *c, *dl, &m, &n, &k)) {
        fprintf(stderr, "cudasim cuBLASLt: the layouts do not describe one GEMM (A %lux%lu, B %lux%lu, C %lux%lu, D %lux%lu)\n",
                (unsigned long)a->rows, (unsigned long)a->cols, (unsigned long)b->rows, (unsigned long)b->cols,
                (unsigned long)c->rows, (unsigned long)c->cols, (unsigned long)dl->rows, (unsigned long)dl->cols);
        return NOT_SUPPORTED;
    }
    memset(results, 0, sizeof *results);
    results->algo.magic = ALGO_MAGIC;
    for (int i = 0; i < 4; ++i) results->algo.align[i] = p->align[i];
    results->state = OK;
    results->waves = 1.0f;
    *count = 1;
    return OK;
}

API Status cublasLtMatmul(Handle* h, Desc* d, const float* alpha, const void* A, Layout* a, const void* B, Layout* b,
                          const float* beta, const void* C, Layout* c, void* D, Layout* dl, const Algo* algo,
                          void* workspace, size_t workspace_bytes, void* stream) {
    if (!h || h->magic != 0x6c74) return NOT_INITIALIZED;
    Gemm* g = new Gemm{*d, *a, *b, *c, *dl, *alpha, *beta, A, B, C, D, 0, 0, 0};
    if (!shape_of(g->d, g->a, g->b, g->c, g->dl, &g->m, &g->n, &g->k)) {
        delete g;
        return INVALID_VALUE;
    }
    if (!algo || algo->magic != ALGO_MAGIC) {
        fprintf(stderr, "cudasim cuBLASLt: cublasLtMatmul without an algorithm from cublasLtMatmulAlgoGetHeuristic\n");
        delete g;
        return NOT_SUPPORTED;
    }
    // The pointers (and, for batches, the strides) must be as aligned as the program promised when the algorithm
    // was chosen.
    const void* ptrs[4] = {A, B, C, D};
    const Layout* layouts[4] = {a, b, c, dl};
    for (int i = 0; i < 4; ++i) {
        const uint64_t stride_bytes = layouts[i]->batch > 1 ? uint64_t(layouts[i]->stride) * type_size(layouts[i]->type) : 0;
        const uint64_t bits = reinterpret_cast<uint64_t>(ptrs[i]) | stride_bytes;
        if (algo->align[i] && bits % algo->align[i]) {
            fprintf(stderr, "cudasim cuBLASLt: operand %c at %p (batch stride %lu bytes) is less aligned than the %lu bytes "
                    "declared when the algorithm was chosen: the GPU algorithm may fault\n",
                    "ABCD"[i], ptrs[i], (unsigned long)stride_bytes, (unsigned long)algo->align[i]);
            delete g;
            return INVALID_VALUE;
        }
    }
    uint64_t ranges[12] = {uint64_t(reinterpret_cast<uintptr_t>(A)), extent(*a), uint64_t(reinterpret_cast<uintptr_t>(B)), extent(*b),
                           uint64_t(reinterpret_cast<uintptr_t>(D)), extent(*dl), 0, 0, 0, 0, 0, 0};
    int n = 3;
    if (*beta != 0.0f) ranges[2 * n] = uint64_t(reinterpret_cast<uintptr_t>(C)), ranges[2 * n + 1] = extent(*c), ++n;
    if (d->epilogue == EPILOGUE_BIAS) {
        const int bias_type = d->bias_type < 0 ? dl->type : d->bias_type;
        ranges[2 * n] = d->bias, ranges[2 * n + 1] = dl->rows * type_size(bias_type), ++n;
    }
    if (workspace_bytes) ranges[2 * n] = uint64_t(reinterpret_cast<uintptr_t>(workspace)), ranges[2 * n + 1] = workspace_bytes, ++n;
    char what[160];
    snprintf(what, sizeof what, "cublasLtMatmul %ldx%ldx%ld%s%s batch %d", (long)g->m, (long)g->n, (long)g->k,
             d->transa ? " A^T" : "", d->transb ? " B^T" : "", dl->batch);
    const int rc = cudasim_enqueue_host_work(stream, what, run_gemm, g, [](void* p) { delete static_cast<Gemm*>(p); },
                                             ranges, n);
    return rc == 0 ? OK : EXECUTION_FAILED;
}

//! cuBLASLt for every GEMM on CUDA: row-major operands, bf16 or f32 storage, f32 compute (never TF32:
//! the f32 path is our accurate one), optional fused bias, strided batches. Called with raw device
//! pointers so that tensors inside an arena or pool allocation need no cudarc slice types; algorithms are chosen once per shape.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream};

use crate::dtype::DType;
use crate::runtime::probe;

/// Workspace cuBLASLt may use; 32 MiB is what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// One GEMM in row-major terms: `C[b] = alpha * op(A[b]) · op(B[b]) + beta * C[b] (+ bias)`, with
/// op(A) `[m, k]` and op(B) `[k, n]`; A is stored `[m, k]` (or `[k, m]` when `trans_a`), B `[k, n]` (or
/// `[n, k]` when `trans_b`), C `[m, n]`; `batch` matrices of each, packed one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    shape: GemmShape,
    ab: DType,
    c: DType,
    bias: bool,
    accumulate: bool,
    /// Byte alignment (at most 256) of cuBLAS's A (our B), B (our A) and C operands, every batch included.
    align: [u32; 3],
}

/// The largest power of two, at most 256, dividing the address and (for batches) the stride in bytes:
/// cuBLASLt's heuristic may otherwise pick an algorithm that assumes 256-byte aligned operands, and tensor
/// views (a pool range, one step of a sequence, one head) often start elsewhere.
fn alignment(ptr: u64, batch_stride_bytes: Option<u64>) -> u32 {
    let bits = ptr | batch_stride_bytes.unwrap_or(0) | 256;
    1 << bits.trailing_zeros()
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host-side handles, only used under the `plans` mutex.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `plan`, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// The cuBLASLt handle, workspace and per-shape plans of one device.
pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    /// Owns the memory `workspace_ptr` points into.
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle is used only on the owning device's single stream; plans are behind a mutex.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        self.plans.lock().unwrap().clear();
        // SAFETY: created in `new`, destroyed once, after its plans.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn data_type(d: DType) -> Result<sys::cudaDataType> {
    match d {
        DType::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => bail!("GEMM: f16 storage is not supported (use bf16 or f32)"),
    }
}

fn check(what: &str, r: Result<(), lt::CublasError>) -> Result<()> {
    r.map_err(|e| anyhow!("cuBLASLt {what}: {e:?}"))
}

impl BlasLt {
    /// The handle and workspace for `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>) -> Result<BlasLt> {
        probe::cublaslt().map_err(|e| anyhow!("cuBLASLt is unavailable: {e}"))?;
        // cuBLASLt works in the calling thread's current context, which cudarc only binds for its own calls.
        stream.context().bind_to_thread().context("binding the CUDA context for cuBLASLt")?;
        let handle = lt::create_handle().map_err(|e| anyhow!("cublasLtCreate: {e:?}"))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).context("allocating the cuBLASLt workspace")?;
        let workspace_ptr = cudarc::driver::DevicePtr::device_ptr(&workspace, stream).0;
        Ok(BlasLt { handle, _workspace: workspace, workspace_ptr, plans: Mutex::new(HashMap::new()) })
    }

    fn plan(&self, key: Key) -> Result<Plan> {
        let s = key.shape;
        let (ab, c) = (data_type(key.ab)?, data_type(key.c)?);
        // Row-major C[m, n] is column-major C^T[n, m] = op(B)^T · op(A)^T: cuBLAS's "A" is our B and its "B"
        // is our A, each described as the column-major view of its row-major storage.
        let (b_rows, b_cols) = if s.trans_b { (s.k, s.n) } else { (s.n, s.k) };
        let (a_rows, a_cols) = if s.trans_a { (s.m, s.k) } else { (s.k, s.m) };
        // SAFETY: every handle is created here and owned by the returned Plan; attribute buffers are live
        // locals of the sizes passed.
        unsafe {
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                .map_err(|e| anyhow!("cuBLASLt descriptor: {e:?}"))?;
            let layouts = [
                lt::create_matrix_layout(ab, b_rows as u64, b_cols as u64, b_rows as i64),
                lt::create_matrix_layout(ab, a_rows as u64, a_cols as u64, a_rows as i64),
                lt::create_matrix_layout(c, s.n as u64, s.m as u64, s.n as i64),
            ];
            let layouts = match layouts {
                [Ok(x), Ok(y), Ok(z)] => [x, y, z],
                _ => {
                    let _ = lt::destroy_matmul_desc(desc);
                    bail!("cuBLASLt could not describe {s:?}");
                }
            };
            let mut plan = Plan { desc, layouts, algo: std::mem::zeroed() };
            let op = |t: bool| if t { 1i32 } else { 0i32 };
            let set_desc = |attr, v: &i32| lt::set_matmul_desc_attribute(desc, attr, v as *const i32 as *const c_void, 4);
            use sys::cublasLtMatmulDescAttributes_t as D;
            check("TRANSA", set_desc(D::CUBLASLT_MATMUL_DESC_TRANSA, &op(s.trans_b)))?;
            check("TRANSB", set_desc(D::CUBLASLT_MATMUL_DESC_TRANSB, &op(s.trans_a)))?;
            if key.bias {
                let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32;
                check("EPILOGUE", set_desc(D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue))?;
            }
            if s.batch > 1 {
                let strides = [(b_rows * b_cols) as i64, (a_rows * a_cols) as i64, (s.m * s.n) as i64];
                for (layout, stride) in plan.layouts.iter().zip(strides) {
                    let count = s.batch as i32;
                    use sys::cublasLtMatrixLayoutAttribute_t as L;
                    check(
                        "BATCH_COUNT",
                        lt::set_matrix_layout_attribute(*layout, L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count as *const i32 as *const c_void, 4),
                    )?;
                    check(
                        "BATCH_STRIDE",
                        lt::set_matrix_layout_attribute(
                            *layout,
                            L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const i64 as *const c_void,
                            8,
                        ),
                    )?;
                }
            }
            let pref = lt::create_matmul_pref().map_err(|e| anyhow!("cuBLASLt preference: {e:?}"))?;
            let ws = WORKSPACE_BYTES as u64;
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let mut r = lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8);
            let [align_a, align_b, align_c] = key.align;
            for (attr, align) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c),
            ] {
                r = r.and_then(|_| lt::set_matmul_pref_attribute(pref, attr, &align as *const u32 as *const c_void, 4));
            }
            let heuristic = r.and_then(|_| {
                lt::get_matmul_algo_heuristic(self.handle, desc, plan.layouts[0], plan.layouts[1], plan.layouts[2], plan.layouts[2], pref)
            });
            let _ = lt::destroy_matmul_pref(pref);
            plan.algo = heuristic.map_err(|e| anyhow!("cuBLASLt has no algorithm for {s:?} ({:?} -> {:?}): {e:?}", key.ab, key.c))?.algo;
            Ok(plan)
        }
    }

    /// Runs the GEMM on `stream`. `a`, `b`, `c` and `bias` are device addresses of tensors the caller
    /// has checked against `shape` and the dtypes; `bias` has `n` elements of `c_dtype`.
    pub fn gemm(
        &self,
        stream: &CudaStream,
        shape: GemmShape,
        ab_dtype: DType,
        c_dtype: DType,
        (a, b, c): (u64, u64, u64),
        bias: Option<u64>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if shape.batch == 0 || shape.m == 0 || shape.n == 0 {
            return Ok(()); // nothing to write (cuBLASLt would still write one m x n product for batch 0)
        }
        if shape.k == 0 {
            // C = beta * C (+ bias): only the no-op case is met (dw += dyᵀ·x over an empty batch).
            ensure!(beta == 1.0 && bias.is_none(), "GEMM {shape:?}: a zero-length reduction is only supported as C += 0 on CUDA");
            return Ok(());
        }
        stream.context().bind_to_thread().context("binding the CUDA context for cuBLASLt")?;
        let strides = |elems: usize, dtype: DType| (shape.batch > 1).then_some((elems * dtype.size()) as u64);
        let align = [
            alignment(b, strides(shape.k * shape.n, ab_dtype)),
            alignment(a, strides(shape.m * shape.k, ab_dtype)),
            alignment(c, strides(shape.m * shape.n, c_dtype)),
        ];
        let key = Key { shape, ab: ab_dtype, c: c_dtype, bias: bias.is_some(), accumulate: beta != 0.0, align };
        let mut plans = self.plans.lock().unwrap();
        let plan = match plans.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(self.plan(key)?),
        };
        // SAFETY: the pointers are live allocations of the sizes the layouts describe (checked by the caller);
        // the bias pointer attribute is set just before the launch that reads it, under the plans mutex.
        unsafe {
            if let Some(bias) = bias {
                check(
                    "BIAS_POINTER",
                    lt::set_matmul_desc_attribute(
                        plan.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &bias as *const u64 as *const c_void,
                        8,
                    ),
                )?;
            }
            check(
                "matmul",
                lt::matmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    b as *const c_void,
                    plan.layouts[0],
                    a as *const c_void,
                    plan.layouts[1],
                    c as *const c_void,
                    plan.layouts[2],
                    c as *mut c_void,
                    plan.layouts[2],
                    &plan.algo,
                    self.workspace_ptr as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as sys::cudaStream_t,
                ),
            )
        }
    }
}

impl std::fmt::Debug for BlasLt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlasLt({} plans)", self.plans.lock().unwrap().len())
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000, None), 256);
        assert_eq!(alignment(0x7f00_0040, None), 64);
        assert_eq!(alignment(0x7f00_0002, None), 2);
        assert_eq!(alignment(0x7f00_0000, Some(80)), 16, "a batch stride of 80 bytes leaves 16-byte alignment");
    }
}

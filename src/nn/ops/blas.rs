//! An optional CBLAS library (MKL, OpenBLAS) for the `f32` matrix products, loaded at run time.
//!
//! Why: MKL's `sgemm` is still faster than lmforge's own kernel ([`super::gemm`]) on the
//! linear layers' products. Measured inside one training step of `bench train`, the two
//! alternating call by call so both see the same machine: MKL 230–260 GFLOP/s against
//! 190–245 for lmforge's kernel (the weight gradients, k = 2048, trail most). The whole step
//! then takes 0.97–1.02× PyTorch's time (which uses MKL too) against 1.11–1.15× on lmforge's
//! kernel (two runs of 5 rounds each, PyTorch in the same run).
//!
//! Why loaded at run time rather than linked behind a cargo feature: the build and the binary
//! stay pure Rust, with nothing to find at link time, and the same binary uses a BLAS wherever
//! one is installed (`LMFORGE_BLAS=/path/to/libmkl_rt.so.3`, read by the CLI). Any library
//! that exports the standard `cblas_sgemm` works.
//!
//! Threads: the library is asked to run single-threaded (MKL's sequential threading layer,
//! OpenBLAS's thread count 1) and lmforge cuts `C` among the threads of its own pool instead.
//! A second thread pool beside candle's would put two spinning threads on each core (see
//! [`super::parallel`]).
//!
//! Only `f32` goes through the library; `f64` (the gradient checks) always uses lmforge's
//! kernel, as do products whose operands are not plain row- or column-major views.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::gemm::{MatRef, SendPtr, PARALLEL_FLOPS};
use super::parallel;
use crate::error::{Error, Result};

/// `cblas_sgemm`, the standard CBLAS signature.
type Sgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

// CBLAS enumerators (cblas.h).
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
/// `MKL_THREADING_SEQUENTIAL` and `MKL_INTERFACE_LP64` (mkl_service.h).
const MKL_SEQUENTIAL: c_int = 1;
const MKL_LP64: c_int = 0;
/// What `openblas_get_parallel` returns for an OpenMP build (openblas_config.h).
const OPENBLAS_OPENMP: c_int = 2;

/// A loaded CBLAS library.
pub struct Blas {
    /// What the library says it is (MKL's version string, OpenBLAS's config and core), or
    /// the path it was loaded from.
    pub description: String,
    sgemm: Sgemm,
    /// Products run through the library so far.
    products: AtomicU64,
}

static LOADED: OnceLock<Blas> = OnceLock::new();

/// The library loaded by [`load`], if any.
pub fn loaded() -> Option<&'static Blas> {
    LOADED.get()
}

/// Load a CBLAS library (a path, or a file name the dynamic loader searches for) and route
/// every later `f32` product of the process through it. Once per process: any second call is
/// an error, since products already run on the first library.
pub fn load(library: &Path) -> Result<&'static Blas> {
    let fail = |reason: String| Error::Input(format!("BLAS library {}: {reason}", library.display()));
    let already = |blas: &Blas| fail(format!("a BLAS is already loaded ({})", blas.description));
    if let Some(blas) = loaded() {
        return Err(already(blas));
    }
    let blas = open(library).map_err(fail)?;
    blas.self_check().map_err(fail)?;
    // Two threads racing to load: the first wins; the second's handle stays open (harmless).
    LOADED.set(blas).map_err(|_| already(loaded().expect("set by the winner")))?;
    Ok(loaded().expect("set above"))
}

#[cfg(unix)]
fn open(library: &Path) -> std::result::Result<Blas, String> {
    use std::os::unix::ffi::OsStrExt;
    let name = CString::new(library.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: dlopen/dlsym/dlerror with NUL-terminated names. The handle is never closed, so
    // the function pointers taken from it stay valid for the life of the process. Each symbol
    // is cast to the signature its library documents (cblas.h, mkl_service.h, openblas's
    // cblas.h); a library that exports these names with other signatures is not a BLAS.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return Err(dl_error().unwrap_or_else(|| "cannot be loaded".into()));
        }
        let symbol = |name: &CStr| -> Option<*mut c_void> {
            let p = libc::dlsym(handle, name.as_ptr());
            (!p.is_null()).then_some(p)
        };
        let sgemm = symbol(c"cblas_sgemm")
            .ok_or("exports no `cblas_sgemm`; expected a CBLAS library such as MKL's libmkl_rt or OpenBLAS")?;
        let mut description = library.display().to_string();
        // MKL's single dynamic library picks its integer width and threading at run time from
        // MKL_INTERFACE_LAYER / MKL_THREADING_LAYER; fix both before the first call. (An
        // ILP64 `cblas_sgemm` would read our 32-bit integers as 64-bit ones.)
        if let Some(set_interface) = symbol(c"MKL_Set_Interface_Layer") {
            let set_interface: unsafe extern "C" fn(c_int) -> c_int = std::mem::transmute(set_interface);
            if set_interface(MKL_LP64) != MKL_LP64 {
                return Err("MKL refused its 32-bit-integer (LP64) interface".into());
            }
        }
        if let Some(set_layer) = symbol(c"MKL_Set_Threading_Layer") {
            let set_layer: unsafe extern "C" fn(c_int) -> c_int = std::mem::transmute(set_layer);
            if set_layer(MKL_SEQUENTIAL) != MKL_SEQUENTIAL {
                return Err("MKL refused its sequential threading layer".into());
            }
        }
        if let Some(version) = symbol(c"MKL_Get_Version_String") {
            let version: unsafe extern "C" fn(*mut c_char, c_int) = std::mem::transmute(version);
            let mut buffer = [0 as c_char; 256];
            // One byte short of the buffer, so the string ends in a NUL whatever MKL writes.
            version(buffer.as_mut_ptr(), buffer.len() as c_int - 1);
            description = CStr::from_ptr(buffer.as_ptr()).to_string_lossy().trim().to_string();
        }
        if let Some(set_threads) = symbol(c"openblas_set_num_threads") {
            let set_threads: unsafe extern "C" fn(c_int) = std::mem::transmute(set_threads);
            set_threads(1);
        }
        if let Some(parallel) = symbol(c"openblas_get_parallel") {
            // An OpenMP build takes its thread count from OpenMP on every call, whatever
            // `openblas_set_num_threads` said: each of our threads would start a full team.
            let parallel: unsafe extern "C" fn() -> c_int = std::mem::transmute(parallel);
            let one_omp_thread = std::env::var("OMP_NUM_THREADS").is_ok_and(|v| v.trim() == "1");
            if parallel() == OPENBLAS_OPENMP && !one_omp_thread {
                return Err("is OpenBLAS built with OpenMP, which would start a thread team per lmforge thread; \
                            use the pthreads build (Debian: libopenblas0-pthread) or set OMP_NUM_THREADS=1"
                    .into());
            }
        }
        if let (Some(config), Some(core)) = (symbol(c"openblas_get_config"), symbol(c"openblas_get_corename")) {
            let config: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(config);
            let core: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(core);
            let text = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().trim().to_string()
                }
            };
            // The core matters: a build too old to know the CPU falls back to a generic one
            // (Debian 12's OpenBLAS 0.3.21 picks "Prescott", SSE3, on Sapphire Rapids; set
            // OPENBLAS_CORETYPE=SkylakeX).
            let (config, core) = (text(config()), text(core()));
            description = if config.contains(&core) { config } else { format!("{config} (core {core})") };
        }
        Ok(Blas { description, sgemm: std::mem::transmute::<*mut c_void, Sgemm>(sgemm), products: AtomicU64::new(0) })
    }
}

#[cfg(not(unix))]
fn open(_library: &Path) -> std::result::Result<Blas, String> {
    Err("loading a BLAS at run time is supported on Unix only".into())
}

#[cfg(unix)]
unsafe fn dl_error() -> Option<String> {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by the loader.
    let message = unsafe { libc::dlerror() };
    (!message.is_null()).then(|| unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned())
}

/// How CBLAS sees a view: (`NO_TRANS` or `TRANS`, leading dimension), or `None` when neither
/// stride is 1 (or the leading dimension is too small for CBLAS to accept it).
fn cblas_layout(v: &MatRef<f32>) -> Option<(c_int, c_int)> {
    // (transposed?, leading dimension, its minimum). A single line's leading dimension is
    // never used, but CBLAS still checks it against that minimum.
    let (trans, ld, min_ld, lines) = if v.col_stride == 1 {
        (NO_TRANS, v.row_stride, v.cols.max(1), v.rows)
    } else if v.row_stride == 1 {
        (TRANS, v.col_stride, v.rows.max(1), v.cols)
    } else {
        return None;
    };
    let ld = if lines <= 1 { ld.max(min_ld) } else { ld };
    if ld < min_ld {
        return None;
    }
    Some((trans, c_int::try_from(ld).ok()?))
}

impl Blas {
    /// One small product with a known answer, so that a library that only looks like CBLAS
    /// (64-bit integers, another signature) is refused at load time rather than corrupting a
    /// training run.
    fn self_check(&self) -> std::result::Result<(), String> {
        // [[1, 2, 3], [4, 5, 6]] · [[1, 0], [0, 1], [1, 1]] = [[4, 5], [10, 11]], into a C
        // with one unused column per row (ldc 3) that must stay as it was.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut c = [-1.0f32; 6];
        // SAFETY: the operands and C have the sizes the dimensions and leading dimensions say.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                NO_TRANS,
                2,
                2,
                3,
                1.0,
                a.as_ptr(),
                3,
                b.as_ptr(),
                2,
                0.0,
                c.as_mut_ptr(),
                3,
            )
        };
        let want = [4.0, 5.0, -1.0, 10.0, 11.0, -1.0];
        if c == want {
            Ok(())
        } else {
            Err(format!("its cblas_sgemm computed {c:?} for a product whose answer is {want:?}; expected the standard CBLAS interface with 32-bit integers"))
        }
    }

    /// Products run through the library so far.
    pub fn products(&self) -> u64 {
        self.products.load(Ordering::Relaxed)
    }

    /// `C = A·B` (or `C += A·B`), `C` row-major with row stride `ldc`, cut into at most one
    /// part per thread (rows of C, or columns when C is wider than tall). Returns false, having done
    /// nothing, when a view does not fit CBLAS: the caller then uses its own kernel. The
    /// caller has checked the shapes and bounds.
    pub(super) fn sgemm(&self, a: MatRef<f32>, b: MatRef<f32>, c: &mut [f32], ldc: usize, accumulate: bool) -> bool {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let (Some((trans_a, lda)), Some((trans_b, ldb))) = (cblas_layout(&a), cblas_layout(&b)) else {
            return false;
        };
        if [m, n, k, ldc].iter().any(|&d| c_int::try_from(d).is_err()) {
            return false;
        }
        self.products.fetch_add(1, Ordering::Relaxed);
        let beta = if accumulate { 1.0 } else { 0.0 };
        let threads = if 2 * m * n * k >= PARALLEL_FLOPS { parallel::threads() } else { 1 };
        let by_rows = m >= n;
        let extent = if by_rows { m } else { n };
        // Parts in multiples of 16 values (whole 64-byte lines of C when C is aligned).
        let part = extent.div_ceil(threads).next_multiple_of(16);
        let c_start = SendPtr(c.as_mut_ptr());
        let run = |index: usize| {
            let first = index * part;
            let len = part.min(extent - first);
            // SAFETY: the part's operands and block of C lie inside the views the caller
            // checked (rows `first..first + len` of A and C, or columns of B and C); parts are
            // disjoint, and every dimension and leading dimension fits CBLAS (checked above).
            unsafe {
                let (rows, cols, a_part, b_part, c_part) = if by_rows {
                    (len, n, a.data.as_ptr().add(first * a.row_stride), b.data.as_ptr(), c_start.get().add(first * ldc))
                } else {
                    (m, len, a.data.as_ptr(), b.data.as_ptr().add(first * b.col_stride), c_start.get().add(first))
                };
                let [rows, cols, k, ldc] = [rows, cols, k, ldc].map(|d| d as c_int);
                (self.sgemm)(
                    ROW_MAJOR, trans_a, trans_b, rows, cols, k, 1.0, a_part, lda, b_part, ldb, beta, c_part, ldc,
                );
            }
        };
        parallel::for_each(extent.div_ceil(part), run);
        true
    }
}

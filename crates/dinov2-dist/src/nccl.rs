//! NCCL for CUDA buffers: a small `dlopen` shim, the 128-byte id and its rendezvous.
//!
//! Nothing NCCL or CUDA is needed to build this module: `libnccl.so.2` is opened with `libloading` the first time
//! a communicator, an id or [`nccl_version`] asks for it, from `DINOV2_NCCL_LIB` (a path) when set, else
//! `libnccl.so.2`, else `libnccl.so` through the dynamic loader's search path. Without it those calls fail with
//! [`Error::Backend`] naming what was tried; everything else (the TCP rendezvous in particular) works anyway.
//! The library ships in the `nvidia-nccl-cu13` wheel as `nvidia/nccl/lib/libnccl.so.2`.
//!
//! One process per GPU: each process sets its CUDA device (`LOCAL_RANK`), the ranks agree on one [`NcclId`]
//! (made by rank 0 and handed out by [`NcclId::exchange`] under MPI, or by [`tcp_rendezvous`] /
//! [`rendezvous_from_env`] under a torchrun-style launcher), then [`NcclComm::init_rank`] builds the communicator
//! and the collectives run on device pointers, ordered on the caller's CUDA stream.
//!
//! ```no_run
//! use dinov2_dist::nccl::{rendezvous_from_env, NcclComm, NcclDType, NcclId, NcclOp};
//! # fn cuda_buffer_and_stream() -> (*mut std::ffi::c_void, *mut std::ffi::c_void) { unimplemented!() }
//! let me = rendezvous_from_env(std::time::Duration::from_secs(300), || NcclId::new().map(NcclId::into_bytes))?;
//! // ... select CUDA device `me.local_rank` here (e.g. candle's `Device::new_cuda(me.local_rank)`) ...
//! let comm = NcclComm::init_rank(&me.id, me.rank, me.world)?;
//! let (grads, stream) = cuda_buffer_and_stream(); // 1024 f32 on the device, and the stream they live on
//! // SAFETY: `grads` holds 1024 f32 on this rank's device, and `stream` belongs to that device.
//! unsafe { comm.all_reduce(grads, grads, 1024, NcclDType::F32, NcclOp::Avg, stream)? };
//! # Ok::<(), dinov2_dist::Error>(())
//! ```

use std::ffi::{c_char, c_int, c_void, CStr};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Communicator, Error, Launcher, Result};

// ---------------------------------------------------------------------------------------------------------------
// The C interface (nccl.h), declared here so that nothing NCCL is needed at build time.
// ---------------------------------------------------------------------------------------------------------------

/// `ncclUniqueId`: `struct { char internal[128]; }`, passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUniqueId {
    internal: [u8; NCCL_UNIQUE_ID_BYTES],
}

/// `ncclComm_t`: an opaque pointer.
type RawComm = *mut c_void;
/// `cudaStream_t`: an opaque pointer (null is the legacy default stream).
type RawStream = *mut c_void;

/// `ncclResult_t` values used here.
const NCCL_SUCCESS: c_int = 0;
const NCCL_IN_PROGRESS: c_int = 7;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueIdFn = unsafe extern "C" fn(*mut RawUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut RawComm, c_int, RawUniqueId, c_int) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    RawStream,
) -> c_int;
type BroadcastFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    RawStream,
) -> c_int;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, RawStream) -> c_int;
type GroupFn = unsafe extern "C" fn() -> c_int;
type CommDestroyFn = unsafe extern "C" fn(RawComm) -> c_int;
type CommGetAsyncErrorFn = unsafe extern "C" fn(RawComm, *mut c_int) -> c_int;
type GetErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;
type GetLastErrorFn = unsafe extern "C" fn(RawComm) -> *const c_char;

/// Size of `ncclUniqueId` (`NCCL_UNIQUE_ID_BYTES` in nccl.h).
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// The environment variable naming the NCCL library file to open before the loader's search path.
pub const NCCL_LIB_ENV: &str = "DINOV2_NCCL_LIB";

const HOW_TO_GET: &str = "NCCL is not part of the build: install it at run time, e.g. `pip install nvidia-nccl-cu13`, \
     and point DINOV2_NCCL_LIB at its `<site-packages>/nvidia/nccl/lib/libnccl.so.2` (or add that folder to \
     LD_LIBRARY_PATH)";

/// The opened library and its entry points (the pointers stay valid as long as `_lib` is alive).
struct NcclLib {
    file: String,
    get_version: GetVersionFn,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    all_reduce: AllReduceFn,
    broadcast: BroadcastFn,
    all_gather: AllGatherFn,
    group_start: GroupFn,
    group_end: GroupFn,
    comm_destroy: CommDestroyFn,
    comm_get_async_error: CommGetAsyncErrorFn,
    get_error_string: GetErrorStringFn,
    /// `ncclGetLastError` (NCCL >= 2.13): optional, adds detail to error messages.
    get_last_error: Option<GetLastErrorFn>,
    _lib: libloading::Library,
}

fn backend_err(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: "nccl",
        reason: reason.into(),
    }
}

/// The files tried by [`lib`], in order: `(how it was named, path)`.
fn default_candidates() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(NCCL_LIB_ENV) {
        let p = p.to_string_lossy().into_owned();
        out.push((format!("{NCCL_LIB_ENV}={p}"), p));
    }
    for name in ["libnccl.so.2", "libnccl.so"] {
        out.push((name.to_string(), name.to_string()));
    }
    out
}

/// Opens the first of `candidates` that loads and resolves its symbols; the error lists every attempt.
fn load_from(candidates: &[(String, String)]) -> Result<NcclLib> {
    let mut tried = Vec::new();
    for (label, path) in candidates {
        // SAFETY: opening a shared library runs its initialisers; NCCL's are sound to run at any time.
        let lib = match unsafe { libloading::Library::new(path) } {
            Ok(lib) => lib,
            Err(e) => {
                tried.push(format!("{label}: {e}"));
                continue;
            }
        };
        return resolve(lib, path);
    }
    Err(backend_err(format!(
        "could not open the NCCL library (tried {}). {HOW_TO_GET}",
        tried.join("; ")
    )))
}

/// Resolves NCCL's entry points in `lib` (opened from `file`).
fn resolve(lib: libloading::Library, file: &str) -> Result<NcclLib> {
    fn sym<T: Copy>(lib: &libloading::Library, file: &str, name: &str) -> Result<T> {
        // SAFETY: each call site names the C signature of `name` from nccl.h as `T`.
        unsafe { lib.get::<T>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| {
                backend_err(format!(
                    "{file} has no `{name}` ({e}): not an NCCL library, or one older than 2.13. {HOW_TO_GET}"
                ))
            })
    }
    Ok(NcclLib {
        file: file.to_string(),
        get_version: sym(&lib, file, "ncclGetVersion")?,
        get_unique_id: sym(&lib, file, "ncclGetUniqueId")?,
        comm_init_rank: sym(&lib, file, "ncclCommInitRank")?,
        all_reduce: sym(&lib, file, "ncclAllReduce")?,
        broadcast: sym(&lib, file, "ncclBroadcast")?,
        all_gather: sym(&lib, file, "ncclAllGather")?,
        group_start: sym(&lib, file, "ncclGroupStart")?,
        group_end: sym(&lib, file, "ncclGroupEnd")?,
        comm_destroy: sym(&lib, file, "ncclCommDestroy")?,
        comm_get_async_error: sym(&lib, file, "ncclCommGetAsyncError")?,
        get_error_string: sym(&lib, file, "ncclGetErrorString")?,
        get_last_error: sym(&lib, file, "ncclGetLastError").ok(),
        _lib: lib,
    })
}

static LIB: OnceLock<NcclLib> = OnceLock::new();

/// The process's NCCL library, opened on first use (a failure is not cached: a later call tries again).
fn lib() -> Result<&'static NcclLib> {
    if let Some(l) = LIB.get() {
        return Ok(l);
    }
    let loaded = load_from(&default_candidates())?;
    // Two threads may both load; the loser's handle is dropped (the loader counts references).
    Ok(LIB.get_or_init(|| loaded))
}

impl NcclLib {
    /// `Ok` for `ncclSuccess`, else the library's message for `code` (and its last error, for `comm`).
    fn check(&self, code: c_int, what: &str, comm: RawComm) -> Result<()> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        Err(backend_err(format!(
            "{what} failed: {}",
            self.describe(code, comm)
        )))
    }

    fn describe(&self, code: c_int, comm: RawComm) -> String {
        // SAFETY: ncclGetErrorString takes any code and returns a static string (or null).
        let text = unsafe { cstr((self.get_error_string)(code)) };
        let mut out = format!(
            "{} (ncclResult_t {code})",
            text.unwrap_or_else(|| "unknown error".into())
        );
        if let Some(last) = self.get_last_error {
            // SAFETY: ncclGetLastError accepts a communicator or null and returns a string owned by NCCL.
            if let Some(detail) = unsafe { cstr(last(comm)) }.filter(|d| !d.trim().is_empty()) {
                out.push_str(&format!(": {}", detail.trim()));
            }
        }
        out
    }
}

/// A copy of a C string, `None` for null.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string.
unsafe fn cstr(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// Decodes `ncclGetVersion`'s code: `major*10000 + minor*100 + patch` since NCCL 2.9, `major*1000 + minor*100 +
/// patch` before.
fn decode_version(code: u32) -> (u32, u32, u32) {
    if code >= 10_000 {
        (code / 10_000, code % 10_000 / 100, code % 100)
    } else {
        (code / 1_000, code % 1_000 / 100, code % 100)
    }
}

/// The version `(major, minor, patch)` of the NCCL library this process opens (opening it if needed): a cheap
/// check that NCCL is usable here, which needs no GPU.
///
/// ```
/// match dinov2_dist::nccl::nccl_version() {
///     Ok((major, minor, patch)) => println!("NCCL {major}.{minor}.{patch}"),
///     Err(e) => println!("no NCCL here: {e}"), // names the files tried and how to get one
/// }
/// ```
pub fn nccl_version() -> Result<(u32, u32, u32)> {
    let l = lib()?;
    let mut code: c_int = 0;
    // SAFETY: ncclGetVersion writes one int.
    l.check(
        unsafe { (l.get_version)(&mut code) },
        "ncclGetVersion",
        std::ptr::null_mut(),
    )?;
    Ok(decode_version(code.max(0) as u32))
}

// ---------------------------------------------------------------------------------------------------------------
// Types of the collectives.
// ---------------------------------------------------------------------------------------------------------------

/// Element type of a collective's buffers (`ncclDataType_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NcclDType {
    /// `ncclFloat32` (7).
    F32,
    /// `ncclFloat64` (8).
    F64,
    /// `ncclFloat16` (6).
    F16,
    /// `ncclBfloat16` (9; NCCL >= 2.10).
    BF16,
    /// `ncclInt64` (4).
    I64,
    /// `ncclUint8` (1).
    U8,
}

impl NcclDType {
    /// The `ncclDataType_t` value.
    pub fn raw(self) -> i32 {
        match self {
            Self::U8 => 1,
            Self::I64 => 4,
            Self::F16 => 6,
            Self::F32 => 7,
            Self::F64 => 8,
            Self::BF16 => 9,
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::F16 | Self::BF16 => 2,
            Self::F32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }
}

/// Reduction of an all-reduce (`ncclRedOp_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NcclOp {
    /// `ncclSum` (0).
    Sum,
    /// `ncclAvg` (4; NCCL >= 2.10): the sum divided by the number of ranks, the gradient all-reduce.
    Avg,
    /// `ncclMax` (2).
    Max,
    /// `ncclMin` (3).
    Min,
}

impl NcclOp {
    /// The `ncclRedOp_t` value.
    pub fn raw(self) -> i32 {
        match self {
            Self::Sum => 0,
            Self::Max => 2,
            Self::Min => 3,
            Self::Avg => 4,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The id.
// ---------------------------------------------------------------------------------------------------------------

/// The 128-byte `ncclUniqueId` that every rank of a communicator passes to [`NcclComm::init_rank`]: rank 0 makes
/// it with [`NcclId::new`] and hands it to the others ([`NcclId::exchange`], [`tcp_rendezvous`]).
#[derive(Clone, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_UNIQUE_ID_BYTES]);

impl NcclId {
    /// A fresh id from `ncclGetUniqueId` (opens the library; made on rank 0 only). It embeds the address NCCL's
    /// bootstrap listens on, chosen from `NCCL_SOCKET_IFNAME` or the first usable interface.
    pub fn new() -> Result<Self> {
        let l = lib()?;
        let mut raw = RawUniqueId {
            internal: [0; NCCL_UNIQUE_ID_BYTES],
        };
        // SAFETY: ncclGetUniqueId writes one ncclUniqueId.
        l.check(
            unsafe { (l.get_unique_id)(&mut raw) },
            "ncclGetUniqueId",
            std::ptr::null_mut(),
        )?;
        Ok(Self(raw.internal))
    }

    /// The id from its bytes (as received from rank 0).
    pub fn from_bytes(bytes: [u8; NCCL_UNIQUE_ID_BYTES]) -> Self {
        Self(bytes)
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; NCCL_UNIQUE_ID_BYTES] {
        &self.0
    }

    /// The id's bytes, by value.
    pub fn into_bytes(self) -> [u8; NCCL_UNIQUE_ID_BYTES] {
        self.0
    }

    /// One id on every rank of `comm` (an `Mpi` group under `mpirun`, say): rank 0 makes it with
    /// [`NcclId::new`] and broadcasts it. When rank 0 cannot make it, it still takes part in the broadcast (with
    /// an empty message), so every rank fails instead of waiting.
    pub fn exchange(comm: &dyn Communicator) -> Result<Self> {
        exchange_with(comm, || Self::new().map(Self::into_bytes))
    }
}

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

fn exchange_with(
    comm: &dyn Communicator,
    make_id: impl FnOnce() -> Result<[u8; NCCL_UNIQUE_ID_BYTES]>,
) -> Result<NcclId> {
    if comm.rank() == 0 {
        match make_id() {
            Ok(id) => {
                let mut buf = id.to_vec();
                comm.broadcast_bytes(&mut buf, 0)?;
                Ok(NcclId(id))
            }
            Err(e) => {
                // Release the other ranks before reporting.
                let _ = comm.broadcast_bytes(&mut Vec::new(), 0);
                Err(e)
            }
        }
    } else {
        let mut buf = Vec::new();
        comm.broadcast_bytes(&mut buf, 0)?;
        let bytes: [u8; NCCL_UNIQUE_ID_BYTES] = buf.as_slice().try_into().map_err(|_| {
            backend_err(if buf.is_empty() {
                format!(
                    "rank {}: rank 0 could not make the NCCL id (see its error)",
                    comm.rank()
                )
            } else {
                format!(
                    "rank {}: rank 0 sent {} bytes, not a {NCCL_UNIQUE_ID_BYTES}-byte NCCL id",
                    comm.rank(),
                    buf.len()
                )
            })
        })?;
        Ok(NcclId(bytes))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// TCP rendezvous (torchrun style), pure std.
// ---------------------------------------------------------------------------------------------------------------

/// First bytes of a peer's hello; then its rank and the world size, as little-endian u32.
const HELLO_MAGIC: &[u8; 8] = b"DV2NCCL1";
const STATUS_OK: u8 = 0;
const STATUS_ERR: u8 = 1;
const MAX_ERR_LEN: usize = 1 << 16;

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Socket timeouts must not be zero.
fn at_least_1ms(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64()).replace(".000 s", " s")
}

fn check_world(rank: usize, world: usize) -> Result<()> {
    if world == 0 || world > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            name: "world",
            reason: format!("a group of {world} ranks"),
        });
    }
    if rank >= world {
        return Err(Error::InvalidArgument {
            name: "rank",
            reason: format!("rank {rank} is not in a group of {world}"),
        });
    }
    Ok(())
}

/// Rank 0's side of [`tcp_rendezvous`], split so that the listening socket exists before the id is made and its
/// address can be learnt (bind port 0, read [`RendezvousHost::local_addr`]).
///
/// ```
/// use dinov2_dist::nccl::{rendezvous_join, RendezvousHost};
/// use std::time::Duration;
/// let host = RendezvousHost::bind("127.0.0.1:0".parse().unwrap())?;
/// let addr = host.local_addr();
/// let ids = std::thread::scope(|s| {
///     let peers: Vec<_> = (1..3)
///         .map(|rank| s.spawn(move || rendezvous_join(addr, rank, 3, Duration::from_secs(10))))
///         .collect();
///     host.serve(3, Duration::from_secs(10), &[7u8; 128]).unwrap();
///     peers.into_iter().map(|p| p.join().unwrap()).collect::<Result<Vec<_>, _>>()
/// })?;
/// assert!(ids.iter().all(|id| id == &[7u8; 128]));
/// # Ok::<(), dinov2_dist::Error>(())
/// ```
#[derive(Debug)]
pub struct RendezvousHost {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RendezvousHost {
    /// Listens at `addr` (port 0: any free port).
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            backend_err(format!(
                "rank 0 could not listen at {addr} for the TCP rendezvous: {e} (is MASTER_PORT free, and \
                 MASTER_ADDR an address of this machine?)"
            ))
        })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Self { listener, addr })
    }

    /// The address it listens at.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `timeout` for ranks `1..world` to connect (each once), then sends each of them `id`.
    ///
    /// Connections that do not speak the rendezvous protocol are dropped and ignored. A rank that is missing at
    /// the deadline, a rank that arrives twice or a peer with another world size ends the rendezvous with an
    /// error, which is also sent to the peers already connected so that they fail too rather than wait.
    pub fn serve(
        self,
        world: usize,
        timeout: Duration,
        id: &[u8; NCCL_UNIQUE_ID_BYTES],
    ) -> Result<()> {
        check_world(0, world)?;
        let deadline = Instant::now() + timeout;
        let addr = self.addr;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| backend_err(format!("rendezvous at {addr}: {e}")))?;
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut arrived = 1;
        while arrived < world {
            match self.listener.accept() {
                Ok((mut stream, from)) => {
                    let hello = stream
                        .set_nonblocking(false)
                        .and_then(|()| read_hello(&mut stream, deadline));
                    let Ok((rank, peer_world)) = hello else {
                        continue; // not a rank of ours (or a broken one): ignore it
                    };
                    let problem = if peer_world != world {
                        Some(format!(
                            "rank {rank} (from {from}) runs with a world size of {peer_world}, rank 0 with {world}"
                        ))
                    } else if rank == 0 || rank >= world {
                        Some(format!(
                            "a peer at {from} claims rank {rank}, which is not in 1..{world}"
                        ))
                    } else if peers[rank].is_some() {
                        Some(format!("rank {rank} arrived twice (again from {from})"))
                    } else {
                        None
                    };
                    if let Some(problem) = problem {
                        let msg = format!("TCP rendezvous at {addr}: {problem}");
                        send_error(&mut stream, &msg);
                        fail_peers(&mut peers, &msg);
                        return Err(Error::Mismatch {
                            rank: 0,
                            reason: msg,
                        });
                    }
                    peers[rank] = Some(stream);
                    arrived += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..world)
                            .filter(|&r| peers[r].is_none())
                            .map(|r| r.to_string())
                            .collect();
                        let msg = format!(
                            "TCP rendezvous at {addr} timed out after {}: rank(s) {} of {world} did not arrive \
                             (do all ranks use the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?)",
                            secs(timeout),
                            missing.join(", ")
                        );
                        fail_peers(&mut peers, &msg);
                        return Err(backend_err(msg));
                    }
                    std::thread::sleep(
                        Duration::from_millis(5).min(at_least_1ms(remaining(deadline))),
                    );
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    let msg = format!("TCP rendezvous at {addr}: accept failed: {e}");
                    fail_peers(&mut peers, &msg);
                    return Err(backend_err(msg));
                }
            }
        }
        let mut reply = Vec::with_capacity(1 + NCCL_UNIQUE_ID_BYTES);
        reply.push(STATUS_OK);
        reply.extend_from_slice(id);
        let mut lost = Vec::new();
        for (rank, stream) in peers.iter_mut().enumerate() {
            if let Some(s) = stream {
                let sent = s
                    .set_write_timeout(Some(at_least_1ms(remaining(deadline))))
                    .and_then(|()| s.write_all(&reply))
                    .and_then(|()| s.flush());
                if let Err(e) = sent {
                    lost.push(format!("rank {rank} ({e})"));
                }
            }
        }
        if lost.is_empty() {
            Ok(())
        } else {
            Err(backend_err(format!(
                "TCP rendezvous at {addr}: could not send the NCCL id to {}",
                lost.join(", ")
            )))
        }
    }
}

fn read_hello(stream: &mut TcpStream, deadline: Instant) -> std::io::Result<(usize, usize)> {
    // A rank sends its hello right after connecting; a silent connection is not one of ours.
    stream.set_read_timeout(Some(at_least_1ms(
        remaining(deadline).min(Duration::from_secs(5)),
    )))?;
    let mut buf = [0u8; 16];
    stream.read_exact(&mut buf)?;
    if &buf[..8] != HELLO_MAGIC {
        return Err(ErrorKind::InvalidData.into());
    }
    let rank = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let world = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    Ok((rank as usize, world as usize))
}

fn send_error(stream: &mut TcpStream, msg: &str) {
    let bytes = &msg.as_bytes()[..msg.len().min(MAX_ERR_LEN)];
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(STATUS_ERR);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&out);
}

fn fail_peers(peers: &mut [Option<TcpStream>], msg: &str) {
    for s in peers.iter_mut().flatten() {
        send_error(s, msg);
    }
}

/// A non-zero rank's side of [`tcp_rendezvous`]: connects to rank 0 at `addr` (retrying until `timeout`, so it
/// may start first), sends its rank and `world`, and returns the id once rank 0 has heard from every rank.
pub fn rendezvous_join(
    addr: SocketAddr,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<[u8; NCCL_UNIQUE_ID_BYTES]> {
    check_world(rank, world)?;
    if rank == 0 {
        return Err(Error::InvalidArgument {
            name: "rank",
            reason: "rank 0 hosts the rendezvous (RendezvousHost), it does not join it".into(),
        });
    }
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    let mut stream = loop {
        let left = remaining(deadline);
        let last =
            match TcpStream::connect_timeout(&addr, at_least_1ms(left.min(Duration::from_secs(2))))
            {
                Ok(s) => break s,
                Err(e) => e,
            };
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(backend_err(format!(
                "rank {rank}: could not reach rank 0 at {addr} for the TCP rendezvous within {} (last error: \
                 {last}); is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?",
                secs(timeout)
            )));
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(500));
    };
    let io = |e: std::io::Error| {
        backend_err(format!(
            "rank {rank}: TCP rendezvous with rank 0 at {addr}: {e}"
        ))
    };
    let _ = stream.set_nodelay(true);
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(HELLO_MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    stream
        .set_write_timeout(Some(at_least_1ms(remaining(deadline))))
        .and_then(|()| stream.write_all(&hello))
        .map_err(io)?;
    stream
        .set_read_timeout(Some(at_least_1ms(remaining(deadline))))
        .map_err(io)?;
    let mut status = [0u8; 1];
    match stream.read_exact(&mut status) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(backend_err(format!(
                "rank {rank}: no NCCL id from rank 0 at {addr} within {} (rank 0 waits for all {world} ranks; \
                 some did not arrive)",
                secs(timeout)
            )))
        }
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
            return Err(backend_err(format!(
                "rank {rank}: rank 0 at {addr} closed the TCP rendezvous before sending the NCCL id (it probably \
                 failed: see its error)"
            )))
        }
        Err(e) => return Err(io(e)),
    }
    if status[0] == STATUS_OK {
        let mut id = [0u8; NCCL_UNIQUE_ID_BYTES];
        stream.read_exact(&mut id).map_err(io)?;
        return Ok(id);
    }
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(io)?;
    let len = (u32::from_le_bytes(len) as usize).min(MAX_ERR_LEN);
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).map_err(io)?;
    Err(backend_err(format!(
        "rank {rank}: rank 0 ended the rendezvous: {}",
        String::from_utf8_lossy(&msg)
    )))
}

/// A torchrun-style rendezvous of the NCCL id, with no service besides rank 0: rank 0 listens at `addr`
/// (`MASTER_ADDR:MASTER_PORT`), calls `make_id` (usually `|| NcclId::new().map(NcclId::into_bytes)`), waits for
/// ranks `1..world` to connect and sends them the id; the others connect (retrying until `timeout`) and receive
/// it. Every rank returns the same 128 bytes, or an error within about `timeout`: one that names the address and
/// the ranks that did not arrive, on rank 0 and on the ranks waiting for them. `make_id` runs on rank 0 only; a
/// group of one needs no network.
///
/// Rank 0 binds `addr` itself; to learn a port chosen by the system, use [`RendezvousHost`] and
/// [`rendezvous_join`], the two halves of this function.
pub fn tcp_rendezvous(
    addr: SocketAddr,
    rank: usize,
    world: usize,
    timeout: Duration,
    make_id: impl FnOnce() -> Result<[u8; NCCL_UNIQUE_ID_BYTES]>,
) -> Result<[u8; NCCL_UNIQUE_ID_BYTES]> {
    check_world(rank, world)?;
    if world == 1 {
        return make_id();
    }
    if rank == 0 {
        // Listen first, so that peers starting now queue up while the id is made.
        let host = RendezvousHost::bind(addr)?;
        let id = make_id()?;
        host.serve(world, timeout, &id)?;
        Ok(id)
    } else {
        rendezvous_join(addr, rank, world, timeout)
    }
}

/// This process's place in a torchrun-style group, and the group's NCCL id (from [`rendezvous_from_env`]).
#[derive(Debug, Clone)]
pub struct TorchrunRank {
    /// The id to pass to [`NcclComm::init_rank`].
    pub id: NcclId,
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world: usize,
    /// `LOCAL_RANK`: the CUDA device this process should use (`RANK` when unset; 0 alone).
    pub local_rank: usize,
}

/// `MASTER_ADDR:MASTER_PORT` from their values (a host name is resolved, IPv4 first).
fn master_endpoint(addr: Option<&str>, port: Option<&str>) -> Result<SocketAddr> {
    let env = |reason: String| Error::Environment { reason };
    let host = addr
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            env(
                "WORLD_SIZE > 1 but MASTER_ADDR is not set (the address of rank 0's machine)"
                    .into(),
            )
        })?;
    let port_text = port.map(str::trim).ok_or_else(|| {
        env(
            "WORLD_SIZE > 1 but MASTER_PORT is not set (a free TCP port on rank 0's machine)"
                .into(),
        )
    })?;
    let port: u16 = port_text.parse().ok().filter(|&p| p != 0).ok_or_else(|| {
        env(format!(
            "MASTER_PORT={port_text:?} is not a TCP port in 1..=65535"
        ))
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| env(format!("MASTER_ADDR={host:?} does not resolve: {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| env(format!("MASTER_ADDR={host:?} resolves to no address")))
}

/// Where rank 0 listens for `master`: a loopback `MASTER_ADDR` itself, otherwise every interface on
/// `MASTER_PORT` (as torchrun's store does), since a host name may resolve differently on rank 0's machine.
fn listen_addr(master: SocketAddr) -> SocketAddr {
    if master.ip().is_loopback() {
        master
    } else if master.is_ipv4() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), master.port())
    } else {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), master.port())
    }
}

/// The NCCL id of a torchrun-style launch, from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and
/// `MASTER_PORT` (see [`crate::launcher`]), exchanged by [`tcp_rendezvous`]. Rank 0 listens on `MASTER_PORT`
/// (on every interface, or on `MASTER_ADDR` when that is a loopback address); `make_id` runs there only.
///
/// Without a launcher (no `WORLD_SIZE`, or 1) this is a group of one: `make_id` runs and no socket is opened.
/// Under an MPI launcher it is an [`Error::Environment`]: use [`NcclId::exchange`] over the MPI communicator.
/// Missing or malformed variables are [`Error::Environment`] errors naming them.
pub fn rendezvous_from_env(
    timeout: Duration,
    make_id: impl FnOnce() -> Result<[u8; NCCL_UNIQUE_ID_BYTES]>,
) -> Result<TorchrunRank> {
    match crate::launcher()? {
        Launcher::Single => Ok(TorchrunRank {
            id: NcclId(make_id()?),
            rank: 0,
            world: 1,
            local_rank: crate::env_usize("LOCAL_RANK")?.unwrap_or(0),
        }),
        Launcher::Torchrun {
            rank,
            world,
            local_rank,
        } => {
            let master = master_endpoint(
                std::env::var("MASTER_ADDR").ok().as_deref(),
                std::env::var("MASTER_PORT").ok().as_deref(),
            )?;
            let id = if rank == 0 {
                let host = RendezvousHost::bind(listen_addr(master))?;
                let id = make_id()?;
                host.serve(world, timeout, &id)?;
                id
            } else {
                rendezvous_join(master, rank, world, timeout)?
            };
            Ok(TorchrunRank {
                id: NcclId(id),
                rank,
                world,
                local_rank,
            })
        }
        Launcher::Mpi { var, world } => Err(Error::Environment {
            reason: format!(
                "started by an MPI launcher ({var}={world}), which sets no MASTER_ADDR/RANK: exchange the NCCL id \
                 over MPI with `NcclId::exchange` instead"
            ),
        }),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The communicator.
// ---------------------------------------------------------------------------------------------------------------

/// An NCCL communicator (`ncclComm_t`) of one rank, on the CUDA device that was current when it was made.
///
/// Collectives take raw device pointers and a raw `cudaStream_t` (for candle, the handle behind
/// `CudaDevice::cuda_stream()`), and are queued on that stream: they return before the data has moved, ordered
/// with the stream's other work. Every rank must call the same collectives in the same order.
///
/// `Send` (the communicator can move to another thread) but not `Sync`: NCCL does not allow one communicator to
/// be used from several threads at once. Dropping it calls `ncclCommDestroy`, which waits for its queued work.
pub struct NcclComm {
    lib: &'static NcclLib,
    comm: RawComm,
    rank: usize,
    world: usize,
}

// SAFETY: an ncclComm_t may be used from any thread, one at a time (NCCL keeps no thread-local state per
// communicator); `NcclComm` is not `Sync`, so `&self` methods never run concurrently on two threads.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("comm", &self.comm)
            .field("library", &self.lib.file)
            .finish()
    }
}

impl NcclComm {
    /// Joins the communicator of `world` ranks named by `id` as `rank` (`ncclCommInitRank`); blocks until every
    /// rank has joined.
    ///
    /// The caller must have made this rank's CUDA device current first (candle does so when it creates
    /// `Device::new_cuda(local_rank)`; otherwise `cudaSetDevice`): the communicator belongs to that device, and
    /// two ranks on one device are refused by NCCL.
    pub fn init_rank(id: &NcclId, rank: usize, world: usize) -> Result<Self> {
        check_world(rank, world)?;
        let (Ok(c_rank), Ok(c_world)) = (c_int::try_from(rank), c_int::try_from(world)) else {
            return Err(Error::InvalidArgument {
                name: "world",
                reason: format!("NCCL takes at most {} ranks", c_int::MAX),
            });
        };
        let lib = lib()?;
        let mut comm: RawComm = std::ptr::null_mut();
        let raw = RawUniqueId { internal: id.0 };
        // SAFETY: ncclCommInitRank writes one communicator handle; the id is passed by value as in nccl.h.
        let code = unsafe { (lib.comm_init_rank)(&mut comm, c_world, raw, c_rank) };
        lib.check(
            code,
            &format!("ncclCommInitRank(rank {rank} of {world})"),
            comm,
        )?;
        if comm.is_null() {
            return Err(backend_err(
                "ncclCommInitRank succeeded but returned no communicator",
            ));
        }
        Ok(Self {
            lib,
            comm,
            rank,
            world,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The file the NCCL library was opened from.
    pub fn library_file(&self) -> &str {
        &self.lib.file
    }

    /// Element-wise `op` over the ranks' `send` buffers, into every rank's `recv` (`ncclAllReduce`), queued on
    /// `stream`. In place when `send == recv`.
    ///
    /// # Safety
    /// `send` and `recv` are device pointers on this communicator's device, each valid for `count` elements of
    /// `dtype` until the work queued on `stream` completes (`recv` for writing, and not overlapping `send` unless
    /// equal to it); `stream` is a valid `cudaStream_t` of that device (or null, the legacy default stream).
    pub unsafe fn all_reduce(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: NcclDType,
        op: NcclOp,
        stream: *mut c_void,
    ) -> Result<()> {
        let code =
            (self.lib.all_reduce)(send, recv, count, dtype.raw(), op.raw(), self.comm, stream);
        self.lib.check(code, "ncclAllReduce", self.comm)
    }

    /// Rank `root`'s `send` buffer into every rank's `recv` (`ncclBroadcast`), queued on `stream`. `send` is read
    /// on `root` only; in place when `send == recv`.
    ///
    /// # Safety
    /// As for [`NcclComm::all_reduce`]: device pointers valid for `count` elements of `dtype` (`send` on `root`
    /// only), a valid stream of this device.
    pub unsafe fn broadcast(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: NcclDType,
        root: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        crate::check_root(root, self.world)?;
        let code = (self.lib.broadcast)(
            send,
            recv,
            count,
            dtype.raw(),
            root as c_int,
            self.comm,
            stream,
        );
        self.lib.check(code, "ncclBroadcast", self.comm)
    }

    /// Every rank's `send` (`count` elements each) concatenated in rank order into every rank's `recv`
    /// (`ncclAllGather`), queued on `stream`. In place when `send` is `recv + rank * count` elements.
    ///
    /// # Safety
    /// `send` is valid for `count` elements of `dtype`, `recv` for `count * world_size()` of them, both device
    /// pointers on this communicator's device and valid until the work on `stream` completes; `stream` is a valid
    /// stream of that device.
    pub unsafe fn all_gather(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: NcclDType,
        stream: *mut c_void,
    ) -> Result<()> {
        let code = (self.lib.all_gather)(send, recv, count, dtype.raw(), self.comm, stream);
        self.lib.check(code, "ncclAllGather", self.comm)
    }

    /// Starts a group (`ncclGroupStart`): the collectives called until [`NcclComm::group_end`] on this thread are
    /// launched together (one launch for many small buffers, or several communicators from one thread).
    pub fn group_start(&self) -> Result<()> {
        // SAFETY: ncclGroupStart takes no arguments; it only opens a per-thread group.
        let code = unsafe { (self.lib.group_start)() };
        self.lib.check(code, "ncclGroupStart", std::ptr::null_mut())
    }

    /// Ends the group opened by [`NcclComm::group_start`] (`ncclGroupEnd`) and launches its collectives.
    pub fn group_end(&self) -> Result<()> {
        // SAFETY: ncclGroupEnd takes no arguments; the grouped calls' buffers were promised valid by their callers.
        let code = unsafe { (self.lib.group_end)() };
        self.lib.check(code, "ncclGroupEnd", std::ptr::null_mut())
    }

    /// `Ok` unless the communicator has failed asynchronously (`ncclCommGetAsyncError`): a peer died, the network
    /// failed. Poll it while waiting on a stream that may never finish; after an error, drop the communicator.
    pub fn async_error(&self) -> Result<()> {
        let mut state: c_int = NCCL_SUCCESS;
        // SAFETY: ncclCommGetAsyncError writes one ncclResult_t for a live communicator.
        let code = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut state) };
        self.lib.check(code, "ncclCommGetAsyncError", self.comm)?;
        if state == NCCL_SUCCESS || state == NCCL_IN_PROGRESS {
            Ok(())
        } else {
            Err(backend_err(format!(
                "rank {} of {}: the communicator failed: {}",
                self.rank,
                self.world,
                self.lib.describe(state, self.comm)
            )))
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: `comm` came from ncclCommInitRank and is destroyed once; nothing uses it afterwards.
        let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadGroup;

    fn id_of(b: u8) -> [u8; NCCL_UNIQUE_ID_BYTES] {
        let mut id = [b; NCCL_UNIQUE_ID_BYTES];
        id[0] = 0xAB;
        id[127] = 0xCD;
        id
    }

    fn local_host() -> RendezvousHost {
        RendezvousHost::bind("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    #[test]
    fn enum_values_match_nccl_h() {
        let dtypes = [
            (NcclDType::U8, 1, 1),
            (NcclDType::I64, 4, 8),
            (NcclDType::F16, 6, 2),
            (NcclDType::F32, 7, 4),
            (NcclDType::F64, 8, 8),
            (NcclDType::BF16, 9, 2),
        ];
        for (d, raw, size) in dtypes {
            assert_eq!((d.raw(), d.size_bytes()), (raw, size), "{d:?}");
        }
        let ops = [
            (NcclOp::Sum, 0),
            (NcclOp::Max, 2),
            (NcclOp::Min, 3),
            (NcclOp::Avg, 4),
        ];
        for (o, raw) in ops {
            assert_eq!(o.raw(), raw, "{o:?}");
        }
        assert_eq!(std::mem::size_of::<RawUniqueId>(), 128);
        assert_eq!(decode_version(22_809), (2, 28, 9));
        assert_eq!(decode_version(2_804), (2, 8, 4));
    }

    #[test]
    fn id_bytes_round_trip() {
        let id = NcclId::from_bytes(id_of(3));
        assert_eq!(id.as_bytes(), &id_of(3));
        assert_eq!(format!("{id:?}"), "NcclId(ab03030303030303…)");
        assert_eq!(id.clone().into_bytes(), id_of(3));
    }

    #[test]
    fn missing_library_names_the_files_and_the_wheel() {
        let tried = vec![(
            format!("{NCCL_LIB_ENV}=/nonexistent/libnccl.so.2"),
            "/nonexistent/libnccl.so.2".to_string(),
        )];
        let Err(e) = load_from(&tried) else {
            panic!("loaded a file that does not exist")
        };
        assert!(
            matches!(
                e,
                Error::Backend {
                    backend: "nccl",
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        for want in [
            "DINOV2_NCCL_LIB=/nonexistent/libnccl.so.2",
            "nvidia-nccl-cu13",
            "nvidia/nccl/lib/libnccl.so.2",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_library_without_nccl_symbols_is_refused() {
        let Err(e) = load_from(&[("libc".into(), "libc.so.6".into())]) else {
            panic!("libc taken for NCCL")
        };
        let msg = e.to_string();
        assert!(msg.contains("libc.so.6 has no `ncclGetVersion`"), "{msg}");
    }

    #[test]
    fn version_is_a_result_either_way() {
        // No libnccl on CPU machines: the error must say how to get it. With NCCL, a 2.x version.
        match nccl_version() {
            Ok((major, _, _)) => assert!(major >= 2),
            Err(e) => assert!(e.to_string().contains("nvidia-nccl-cu13"), "{e}"),
        }
    }

    /// With a real NCCL (`DINOV2_NCCL_LIB=.../nvidia/nccl/lib/libnccl.so.2` from the `nvidia-nccl-cu13` wheel; no
    /// GPU needed): every symbol resolves, the version is 2.x and the library makes a unique id.
    #[test]
    #[ignore = "needs a real libnccl.so.2 in DINOV2_NCCL_LIB"]
    fn a_real_library_resolves_and_makes_ids() {
        let (major, minor, patch) = nccl_version().unwrap();
        assert_eq!(major, 2, "{major}.{minor}.{patch}");
        let id = NcclId::new().unwrap();
        assert!(id.as_bytes().iter().any(|&b| b != 0), "an all-zero id");
        assert_ne!(
            id.as_bytes(),
            NcclId::new().unwrap().as_bytes(),
            "two calls, one id"
        );
        eprintln!("NCCL {major}.{minor}.{patch}: symbols resolved, unique ids made");
    }

    #[test]
    fn exchange_broadcasts_rank_zeros_id() {
        let ids: Vec<Result<NcclId>> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadGroup::new(3)
                .unwrap()
                .into_iter()
                .map(|r| s.spawn(move || exchange_with(&r, || Ok(id_of(9)))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for id in ids {
            assert_eq!(id.unwrap().as_bytes(), &id_of(9));
        }
    }

    #[test]
    fn exchange_fails_every_rank_when_rank_zero_cannot_make_the_id() {
        let errs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadGroup::with_timeout(3, Duration::from_secs(10))
                .unwrap()
                .into_iter()
                .map(|r| {
                    s.spawn(move || {
                        exchange_with(&r, || Err(backend_err("no libnccl")))
                            .unwrap_err()
                            .to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errs[0].contains("no libnccl"), "{}", errs[0]);
        for e in &errs[1..] {
            assert!(e.contains("rank 0 could not make the NCCL id"), "{e}");
        }
    }

    #[test]
    fn three_ranks_get_rank_zeros_id() {
        let host = local_host();
        let addr = host.local_addr();
        let t = Duration::from_secs(20);
        let got = std::thread::scope(|s| {
            let peers: Vec<_> = (1..3)
                .map(|rank| {
                    s.spawn(move || {
                        // the non-zero ranks go through the public entry point; `make_id` is rank 0's only
                        tcp_rendezvous(addr, rank, 3, t, || panic!("make_id called on rank {rank}"))
                    })
                })
                .collect();
            host.serve(3, t, &id_of(1)).unwrap();
            peers
                .into_iter()
                .map(|p| p.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(got, vec![id_of(1), id_of(1)]);
    }

    #[test]
    fn rank_zero_through_tcp_rendezvous_and_peers_that_start_first() {
        // Learn a free port, release it, and start the peers before rank 0 listens: they must retry.
        let addr = local_host().local_addr();
        let t = Duration::from_secs(20);
        let got = std::thread::scope(|s| {
            let peers: Vec<_> = (1..4)
                .map(|rank| s.spawn(move || rendezvous_join(addr, rank, 4, t)))
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            let mine = tcp_rendezvous(addr, 0, 4, t, || Ok(id_of(2))).unwrap();
            let mut all = vec![mine];
            all.extend(peers.into_iter().map(|p| p.join().unwrap().unwrap()));
            all
        });
        assert_eq!(got, vec![id_of(2); 4]);
    }

    #[test]
    fn a_missing_rank_is_a_timeout_on_every_rank_not_a_hang() {
        let host = local_host();
        let addr = host.local_addr();
        let start = Instant::now();
        let (host_err, peer_err) = std::thread::scope(|s| {
            // rank 2 of 3 never comes; rank 1 waits longer than rank 0, so it hears rank 0's verdict
            let peer = s.spawn(move || rendezvous_join(addr, 1, 3, Duration::from_secs(20)));
            let host_err = host
                .serve(3, Duration::from_millis(500), &id_of(0))
                .unwrap_err();
            (host_err, peer.join().unwrap().unwrap_err())
        });
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
        let msg = host_err.to_string();
        assert!(
            msg.contains(&addr.to_string()) && msg.contains("rank(s) 2 of 3 did not arrive"),
            "{msg}"
        );
        assert!(msg.contains("timed out after 0.500 s"), "{msg}");
        let msg = peer_err.to_string();
        assert!(
            msg.contains("rank 1: rank 0 ended the rendezvous") && msg.contains("rank(s) 2 of 3"),
            "{msg}"
        );
    }

    #[test]
    fn a_peer_without_rank_zero_times_out() {
        let addr = local_host().local_addr(); // nothing listens there any more
        let start = Instant::now();
        let e = rendezvous_join(addr, 1, 2, Duration::from_millis(400)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("could not reach rank 0 at {addr}")),
            "{msg}"
        );
    }

    #[test]
    fn a_peer_whose_rank_zero_never_answers_times_out() {
        // Something listens but never replies (rank 0 waiting for others): the peer's own deadline ends it.
        let host = local_host();
        let addr = host.local_addr();
        let e = rendezvous_join(addr, 1, 2, Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("no NCCL id from rank 0"), "{e}");
        drop(host);
    }

    #[test]
    fn strays_are_ignored_and_bad_peers_refused() {
        let host = local_host();
        let addr = host.local_addr();
        let t = Duration::from_secs(20);
        let got = std::thread::scope(|s| {
            let stray = s.spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            });
            stray.join().unwrap();
            let peer = s.spawn(move || rendezvous_join(addr, 1, 2, t));
            host.serve(2, t, &id_of(5)).unwrap();
            peer.join().unwrap().unwrap()
        });
        assert_eq!(got, id_of(5));

        // A peer with another world size, or a rank twice, ends the rendezvous on every side.
        for (ranks, worlds, want) in [
            ([1, 2], [3, 4], "world size of 4"),
            ([1, 1], [3, 3], "rank 1 arrived twice"),
        ] {
            let host = local_host();
            let addr = host.local_addr();
            let (host_err, peer_errs) = std::thread::scope(|s| {
                let peers: Vec<_> = (0..2)
                    .map(|i| {
                        let (rank, world) = (ranks[i], worlds[i]);
                        std::thread::sleep(Duration::from_millis(50)); // arrive in order
                        s.spawn(move || rendezvous_join(addr, rank, world, t))
                    })
                    .collect();
                let host_err = host.serve(3, t, &id_of(6)).unwrap_err();
                let errs: Vec<_> = peers
                    .into_iter()
                    .map(|p| p.join().unwrap().unwrap_err())
                    .collect();
                (host_err, errs)
            });
            assert!(
                matches!(host_err, Error::Mismatch { rank: 0, .. }),
                "{host_err:?}"
            );
            assert!(host_err.to_string().contains(want), "{host_err}");
            for e in peer_errs {
                assert!(e.to_string().contains(want), "{e}");
            }
        }
    }

    #[test]
    fn argument_checks() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t = Duration::from_millis(10);
        assert!(tcp_rendezvous(addr, 2, 2, t, || Ok(id_of(0))).is_err());
        assert!(tcp_rendezvous(addr, 0, 0, t, || Ok(id_of(0))).is_err());
        assert!(rendezvous_join(addr, 0, 2, t).is_err());
        // a group of one opens no socket
        assert_eq!(
            tcp_rendezvous(addr, 0, 1, t, || Ok(id_of(4))).unwrap(),
            id_of(4)
        );
    }

    #[test]
    fn master_endpoint_parses_and_names_the_variables() {
        assert_eq!(
            master_endpoint(Some("127.0.0.1"), Some("29500")).unwrap(),
            "127.0.0.1:29500".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            master_endpoint(Some("[::1]"), Some("7")).unwrap(),
            "[::1]:7".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            master_endpoint(Some("localhost"), Some("29500"))
                .unwrap()
                .port(),
            29500
        );
        for (addr, port, want) in [
            (None, Some("1"), "MASTER_ADDR is not set"),
            (Some(" "), Some("1"), "MASTER_ADDR is not set"),
            (Some("127.0.0.1"), None, "MASTER_PORT is not set"),
            (Some("127.0.0.1"), Some("http"), "MASTER_PORT=\"http\""),
            (Some("127.0.0.1"), Some("0"), "MASTER_PORT=\"0\""),
            (Some("127.0.0.1"), Some("70000"), "MASTER_PORT=\"70000\""),
        ] {
            let e = master_endpoint(addr, port).unwrap_err();
            assert!(
                matches!(e, Error::Environment { .. }) && e.to_string().contains(want),
                "{e}"
            );
        }
        let lo: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(listen_addr(lo), lo);
        assert_eq!(
            listen_addr("10.1.2.3:5".parse().unwrap()),
            "0.0.0.0:5".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn comm_is_send() {
        fn send<T: Send>() {}
        send::<NcclComm>();
        send::<NcclId>();
    }
}

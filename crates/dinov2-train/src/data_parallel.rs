//! Data-parallel training over a [`Communicator`]: gradient averaging in buckets, the start-up parameter
//! broadcast, and a cheap check that the ranks still hold the same weights.
//!
//! Each rank runs the same model on its own shard of the data; after every backward, [`DataParallel`] averages
//! the student's gradients over the ranks (PyTorch DDP's semantics: every rank's loss is a mean over its local
//! batch, so the average of the local gradients is the gradient of the mean over the global batch). Since every
//! rank then holds the same gradient, the same clipping, AdamW and EMA steps keep the weights identical on every
//! rank, bit for bit.
//!
//! **Buckets.** The student's parameters are taken in name order (the same on every rank), and their gradients
//! are flattened to f32 into buckets of about [`DEFAULT_BUCKET_BYTES`] (a parameter larger than a bucket gets one
//! of its own); each bucket is one `all_reduce_sum_f32`. Every parameter of a bucket also contributes a
//! has-gradient flag (1 or 0) that is reduced with it: a parameter without a gradient on one rank is packed as
//! zeros, so the layout never depends on which gradients exist, and its averaged gradient is inserted only when
//! some rank had one (a parameter no rank used stays without a gradient, as in a single process).
//!
//! **Overlap.** candle's `backward` is one call that returns every gradient at the end, so the all-reduce
//! cannot start during the backward as DDP's hooks do. What does overlap: a scoped communication thread reduces
//! bucket `k` while this thread packs bucket `k + 1` and unpacks bucket `k - 1` (the [`Communicator`] is `Sync`;
//! MPI runs with `MPI_THREAD_SERIALIZED`). Measured with two MPI processes on one 2-core machine, 25 MiB of
//! gradients take 66 ms in one 25 MiB bucket and 33-39 ms in 4 MiB buckets (`gradient_all_reduce_time` in the
//! root `tests/mpi_train.rs`; `dinov2 train --grad-bucket-mib`).
//!
//! **What is not batch-split invariant.** KoLeo's nearest neighbour is searched within each rank's local batch,
//! as in the official code, so with KoLeo on, `N` ranks × `B` is a different loss from one rank × `N·B`;
//! stochastic depth draws its masks per rank; and the iBOT centre is, as official, the mean over ranks of each
//! rank's mean over its masked patches, which is the global batch's mean only when every rank masks as many
//! patches. Everything else of the DINOv2 loss is (the DINO centre and the Sinkhorn-Knopp normalisation are
//! reduced over the ranks by the loss crate; tests/data_parallel.rs checks 2 ranks × B against 1 rank × 2B).
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{backprop::GradStore, Device, Tensor, Var};
//! use dinov2_dist::{Communicator, ThreadGroup};
//! use dinov2_train::data_parallel::DataParallel;
//! let grads: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let hs: Vec<_> = ThreadGroup::new(2)?
//!         .into_iter()
//!         .map(|r| s.spawn(move || -> dinov2_train::Result<Vec<f32>> {
//!             let dp = DataParallel::new(Arc::new(r));
//!             let w = Var::new(&[1f32, 2.0], &Device::Cpu)?;
//!             // rank r's loss: (r + 1) · Σ w, so its gradient is r + 1 everywhere
//!             let loss = (w.as_tensor().sum_all()? * (dp.rank() + 1) as f64)?;
//!             let mut g: GradStore = loss.backward()?;
//!             dp.all_reduce_gradients(&mut g, &[("w".to_string(), w.clone())])?;
//!             Ok(g.get(w.as_tensor()).unwrap().to_vec1()?)
//!         }))
//!         .collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).collect::<dinov2_train::Result<Vec<_>>>()
//! })?;
//! assert_eq!(grads, vec![vec![1.5, 1.5], vec![1.5, 1.5]]); // the mean of 1 and 2 on both ranks
//! # Ok::<(), dinov2_train::Error>(())
//! ```

use std::sync::mpsc;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Shape, Storage, Tensor, Var};
use dinov2_dist::Communicator;

use crate::error::{Error, Result};

/// The default bucket size: 25 MiB of f32 values (PyTorch DDP's default `bucket_cap_mb`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Gradient averaging and weight synchronisation over a [`Communicator`] (see the [module docs](self)).
#[derive(Clone)]
pub struct DataParallel {
    comm: Arc<dyn Communicator>,
    bucket_bytes: usize,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("backend", &self.comm.backend())
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("bucket_bytes", &self.bucket_bytes)
            .finish()
    }
}

/// What one [`DataParallel::all_reduce_gradients`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncStats {
    /// Number of all-reduce calls (buckets).
    pub buckets: usize,
    /// f32 values reduced (gradients and flags).
    pub values: usize,
    /// Parameters that had a gradient on some rank (after the call: on every rank).
    pub with_gradient: usize,
}

/// One bucket: a range of the parameter list and its length in f32 values (flags first, then the gradients).
#[derive(Debug, Clone)]
struct Bucket {
    params: std::ops::Range<usize>,
    len: usize,
}

impl DataParallel {
    /// Averaging over `comm` with buckets of [`DEFAULT_BUCKET_BYTES`].
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        }
    }

    /// Buckets of `bytes` (f32 values × 4; at least one parameter per bucket). Errors: 0 bytes.
    ///
    /// ```
    /// let dp = dinov2_train::data_parallel::DataParallel::new(std::sync::Arc::new(dinov2_dist::SingleProcess))
    ///     .with_bucket_bytes(1 << 20)?;
    /// assert_eq!(dp.bucket_bytes(), 1 << 20);
    /// assert!(dp.with_bucket_bytes(0).is_err());
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Result<Self> {
        if bytes == 0 {
            return Err(Error::InvalidArgument {
                name: "bucket_bytes",
                reason: "must be at least 1".into(),
            });
        }
        self.bucket_bytes = bytes;
        Ok(self)
    }

    /// The bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn buckets(&self, params: &[(String, Var)]) -> Vec<Bucket> {
        let cap = (self.bucket_bytes / 4).max(1);
        let mut out: Vec<Bucket> = Vec::new();
        let mut start = 0;
        let mut len = 0;
        for (i, (_, v)) in params.iter().enumerate() {
            let n = v.elem_count() + 1; // the flag
            if i > start && len + n > cap {
                out.push(Bucket {
                    params: start..i,
                    len,
                });
                (start, len) = (i, 0);
            }
            len += n;
        }
        if start < params.len() {
            out.push(Bucket {
                params: start..params.len(),
                len,
            });
        }
        out
    }

    /// Replaces every gradient of `params` in `grads` by its average over the ranks (a collective: every rank
    /// passes the same parameters, in any order, as `(name, var)` pairs; they are reduced in name order).
    /// The averaged gradients have the dtype, device and shape of the local gradient (of the parameter where
    /// this rank had none). One rank: nothing is done.
    ///
    /// Example: the [module docs](self).
    pub fn all_reduce_gradients(
        &self,
        grads: &mut GradStore,
        params: &[(String, Var)],
    ) -> Result<SyncStats> {
        let world = self.world_size();
        if world == 1 {
            let with_gradient = params
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                .count();
            return Ok(SyncStats {
                with_gradient,
                ..SyncStats::default()
            });
        }
        let mut params: Vec<(String, Var)> = params.to_vec();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let buckets = self.buckets(&params);
        let comm = self.comm.as_ref();
        let mut stats = SyncStats {
            buckets: buckets.len(),
            values: buckets.iter().map(|b| b.len).sum(),
            with_gradient: 0,
        };
        let inv = 1.0 / world as f32;
        std::thread::scope(|s| -> Result<()> {
            let (to_comm, comm_in) = mpsc::channel::<Vec<f32>>();
            let (comm_out, from_comm) = mpsc::channel::<dinov2_dist::Result<Vec<f32>>>();
            let worker = s.spawn(move || {
                for mut buf in comm_in {
                    let r = comm.all_reduce_sum_f32(&mut buf).map(|()| buf);
                    let failed = r.is_err();
                    if comm_out.send(r).is_err() || failed {
                        return;
                    }
                }
            });
            // pack bucket k + 1 while bucket k is reduced; unpack in order as the results come back
            let mut sent = 0;
            let mut received = 0;
            let mut result = Ok(());
            while received < buckets.len() {
                if sent < buckets.len() && sent <= received + 1 {
                    let buf = pack(grads, &params, &buckets[sent])?;
                    if to_comm.send(buf).is_err() {
                        break;
                    }
                    sent += 1;
                    continue;
                }
                let reduced = match from_comm.recv() {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        result = Err(e.into());
                        break;
                    }
                    Err(_) => break,
                };
                stats.with_gradient += unpack(grads, &params, &buckets[received], &reduced, inv)?;
                received += 1;
            }
            drop(to_comm);
            if worker.join().is_err() {
                return Err(Error::InvalidArgument {
                    name: "communicator",
                    reason: "the gradient all-reduce thread panicked".into(),
                });
            }
            if result.is_ok() && received < buckets.len() {
                result = Err(Error::InvalidArgument {
                    name: "communicator",
                    reason: "the gradient all-reduce thread stopped early".into(),
                });
            }
            result
        })?;
        Ok(stats)
    }

    /// Copies rank `root`'s values of `vars` to every rank (a collective: every rank passes the same parameters;
    /// they are sent in name order, in buckets). Used at the start of a run so that every rank starts from
    /// the same weights even where their initialisations differed. One rank: nothing is done.
    pub fn broadcast_parameters(&self, vars: &[(String, Var)], root: usize) -> Result<()> {
        if self.world_size() == 1 {
            if root != 0 {
                self.comm.broadcast_f32(&mut [], root)?;
            }
            return Ok(());
        }
        let mut vars: Vec<(String, Var)> = vars.to_vec();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for b in self.buckets(&vars) {
            let mut buf = Vec::with_capacity(b.len);
            for (_, v) in &vars[b.params.clone()] {
                append_f32(v.as_tensor(), &mut buf)?;
            }
            self.comm.broadcast_f32(&mut buf, root)?;
            let mut off = 0;
            for (_, v) in &vars[b.params.clone()] {
                let n = v.elem_count();
                let t = Tensor::from_slice(&buf[off..off + n], v.shape(), &Device::Cpu)?
                    .to_dtype(v.dtype())?
                    .to_device(v.device())?;
                v.set(&t)?;
                off += n;
            }
        }
        Ok(())
    }

    /// Checks that every rank holds bit-identical `tensors` (a collective): a 64-bit hash of their names,
    /// shapes and bits on each rank is gathered and compared. Errors: [`Error::RanksOutOfSync`] naming `what`
    /// and the ranks that differ from rank 0. One rank: nothing is done.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{Device, Tensor};
    /// use dinov2_dist::{Communicator, ThreadGroup};
    /// use dinov2_train::{data_parallel::DataParallel, Error};
    /// let results: Vec<dinov2_train::Result<()>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = ThreadGroup::new(2).unwrap()
    ///         .into_iter()
    ///         .map(|r| s.spawn(move || {
    ///             let w = Tensor::new(&[1f32, r.rank() as f32], &Device::Cpu)?; // differs on rank 1
    ///             DataParallel::new(Arc::new(r)).check_in_sync("weights", 3, &[("w".into(), w)])
    ///         }))
    ///         .collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert!(results.iter().all(|r| matches!(r, Err(Error::RanksOutOfSync { iteration: 3, .. }))));
    /// ```
    pub fn check_in_sync(
        &self,
        what: &str,
        iteration: u64,
        tensors: &[(String, Tensor)],
    ) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = Fnv::new();
        for (name, t) in sorted {
            h.bytes(name.as_bytes());
            for d in t.dims() {
                h.u64(*d as u64);
            }
            let t = t.detach().to_device(&Device::Cpu)?;
            let t = if t.dtype() == DType::F64 {
                t
            } else {
                t.to_dtype(DType::F32)?
            };
            match t.dtype() {
                DType::F64 => {
                    for v in t.flatten_all()?.to_vec1::<f64>()? {
                        h.u64(v.to_bits());
                    }
                }
                _ => {
                    let mut buf = Vec::new();
                    append_f32(&t, &mut buf)?;
                    for v in buf {
                        h.u64(u64::from(v.to_bits()));
                    }
                }
            }
        }
        let all = self.comm.all_gather_i64(&[h.0 as i64])?;
        let differ: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(Error::RanksOutOfSync {
                what: what.to_string(),
                iteration,
                ranks: differ,
            })
        }
    }

    /// The mean over ranks of `values` (a collective; every rank passes as many). One rank: unchanged.
    pub fn average(&self, values: &mut [f64]) -> Result<()> {
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        self.comm.all_reduce_sum_f64(values)?;
        for v in values.iter_mut() {
            *v /= world as f64;
        }
        Ok(())
    }

    /// Fails with [`Error::InvalidArgument`] unless every rank passes the same parameter names and shapes (a
    /// collective), so that a configuration that differs between ranks is an error and not a bucket mismatch.
    pub fn check_layout(&self, params: &[(String, Var)]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let mut sorted: Vec<&(String, Var)> = params.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = Fnv::new();
        for (name, v) in sorted {
            h.bytes(name.as_bytes());
            for d in v.dims() {
                h.u64(*d as u64);
            }
        }
        let all = self.comm.all_gather_i64(&[h.0 as i64])?;
        match (1..all.len()).find(|&r| all[r] != all[0]) {
            None => Ok(()),
            Some(r) => Err(Error::InvalidArgument {
                name: "communicator",
                reason: format!(
                    "rank {r} has other parameters (names or shapes) than rank 0: every rank must train \
                     the same configuration"
                ),
            }),
        }
    }
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// Appends `t`'s values as f32 (a straight copy for contiguous f32 tensors on the CPU).
fn append_f32(t: &Tensor, out: &mut Vec<f32>) -> Result<()> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            out.extend_from_slice(&data[a..b]);
            return Ok(());
        }
    }
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    out.extend_from_slice(&v);
    Ok(())
}

/// A bucket's send buffer: one has-gradient flag per parameter, then every gradient (zeros where missing).
fn pack(grads: &GradStore, params: &[(String, Var)], b: &Bucket) -> Result<Vec<f32>> {
    let mut buf = Vec::with_capacity(b.len);
    let ps = &params[b.params.clone()];
    for (_, v) in ps {
        buf.push(if grads.get(v.as_tensor()).is_some() {
            1.0
        } else {
            0.0
        });
    }
    for (name, v) in ps {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                if g.elem_count() != v.elem_count() {
                    return Err(Error::InvalidArgument {
                        name: "grads",
                        reason: format!(
                            "the gradient of `{name}` has shape {:?}, the parameter {:?}",
                            g.dims(),
                            v.dims()
                        ),
                    });
                }
                append_f32(g, &mut buf)?;
            }
            None => buf.resize(buf.len() + v.elem_count(), 0.0),
        }
    }
    Ok(buf)
}

/// Writes a reduced bucket back (`× inv`, the mean); returns how many of its parameters have a gradient.
fn unpack(
    grads: &mut GradStore,
    params: &[(String, Var)],
    b: &Bucket,
    reduced: &[f32],
    inv: f32,
) -> Result<usize> {
    let ps = &params[b.params.clone()];
    let mut off = ps.len();
    let mut n_with = 0;
    for (i, (_, v)) in ps.iter().enumerate() {
        let n = v.elem_count();
        let values = &reduced[off..off + n];
        off += n;
        if reduced[i] == 0.0 {
            continue; // no rank had a gradient
        }
        n_with += 1;
        let (dtype, device, shape): (DType, Device, Shape) = match grads.get(v.as_tensor()) {
            Some(g) => (g.dtype(), g.device().clone(), g.shape().clone()),
            None => (v.dtype(), v.device().clone(), v.shape().clone()),
        };
        let mean: Vec<f32> = values.iter().map(|x| x * inv).collect();
        let t = Tensor::from_vec(mean, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)?;
        grads.insert(v.as_tensor(), t);
    }
    Ok(n_with)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinov2_dist::{SingleProcess, ThreadGroup};

    fn on_ranks<T: Send>(world: usize, f: impl Fn(DataParallel) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = ThreadGroup::new(world)
                .unwrap()
                .into_iter()
                .map(|r| s.spawn(move || f(DataParallel::new(Arc::new(r)))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn vars() -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        vec![
            (
                "b.weight".into(),
                Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap(),
            ),
            (
                "a.bias".into(),
                Var::new(&[0.5f32, 0.25, 0.125], &dev).unwrap(),
            ),
            ("c.unused".into(), Var::new(&[7f32], &dev).unwrap()),
        ]
    }

    /// Rank r's loss: (r + 1)·Σ b.weight, plus Σ a.bias² on rank 1 only; `c.unused` is used by no rank.
    fn rank_grads(rank: usize, params: &[(String, Var)]) -> GradStore {
        let w = params[0].1.as_tensor();
        let mut loss = (w.sum_all().unwrap() * (rank + 1) as f64).unwrap();
        if rank == 1 {
            loss = (loss + params[1].1.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    #[test]
    fn a_gradient_missing_on_one_rank_keeps_the_layout() {
        for bucket_bytes in [4, 12, 1 << 20] {
            let out = on_ranks(2, |dp| {
                let dp = dp.with_bucket_bytes(bucket_bytes).unwrap();
                let params = vars();
                let mut g = rank_grads(dp.rank(), &params);
                assert_eq!(g.get(params[1].1.as_tensor()).is_some(), dp.rank() == 1);
                let stats = dp.all_reduce_gradients(&mut g, &params).unwrap();
                let get = |i: usize| -> Option<Vec<f32>> {
                    g.get(params[i].1.as_tensor())
                        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                };
                (stats, get(0), get(1), get(2))
            });
            for (stats, w, b, unused) in out {
                assert_eq!(stats.with_gradient, 2, "bucket_bytes={bucket_bytes}");
                assert_eq!(stats.values, 8 + 3); // 8 values and 3 flags
                assert_eq!(w.unwrap(), vec![1.5; 4]); // (1 + 2) / 2
                assert_eq!(b.unwrap(), vec![0.5, 0.25, 0.125]); // (0 + 2·bias) / 2
                assert_eq!(unused, None);
                if bucket_bytes == 4 {
                    assert_eq!(stats.buckets, 3);
                } else if bucket_bytes == 1 << 20 {
                    assert_eq!(stats.buckets, 1);
                }
            }
        }
    }

    #[test]
    fn one_rank_does_nothing() {
        let dp = DataParallel::new(Arc::new(SingleProcess));
        let params = vars();
        let mut g = rank_grads(0, &params);
        let before = g.get(params[0].1.as_tensor()).unwrap().id();
        let stats = dp.all_reduce_gradients(&mut g, &params).unwrap();
        assert_eq!((stats.buckets, stats.with_gradient), (0, 1));
        assert_eq!(g.get(params[0].1.as_tensor()).unwrap().id(), before);
    }

    #[test]
    fn broadcast_makes_ranks_identical_and_the_check_sees_it() {
        let out = on_ranks(3, |dp| {
            let params = vars();
            // different initialisations per rank
            for (_, v) in &params {
                v.set(&(v.as_tensor() + dp.rank() as f64).unwrap()).unwrap();
            }
            let tensors = |p: &[(String, Var)]| -> Vec<(String, Tensor)> {
                p.iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                    .collect()
            };
            let before = dp.check_in_sync("student", 0, &tensors(&params));
            dp.check_layout(&params).unwrap();
            dp.clone()
                .with_bucket_bytes(8)
                .unwrap()
                .broadcast_parameters(&params, 0)
                .unwrap();
            dp.check_in_sync("student", 0, &tensors(&params)).unwrap();
            (before, params[0].1.as_tensor().to_vec2::<f32>().unwrap())
        });
        for (rank, (before, w)) in out.into_iter().enumerate() {
            match before {
                Err(Error::RanksOutOfSync { ranks, .. }) => assert_eq!(ranks, vec![1, 2]),
                other => panic!("rank {rank}: {other:?}"),
            }
            assert_eq!(w, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        }
    }

    #[test]
    fn a_layout_mismatch_is_an_error() {
        let out = on_ranks(2, |dp| {
            let mut params = vars();
            if dp.rank() == 1 {
                params.pop();
            }
            dp.check_layout(&params).map_err(|e| e.to_string())
        });
        for r in out {
            assert!(r.unwrap_err().contains("rank 1 has other parameters"));
        }
    }
}

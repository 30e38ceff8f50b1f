//! The reduction interface used by centering and Sinkhorn-Knopp.
//!
//! The official losses sum some statistics over the global batch with `torch.distributed.all_reduce`
//! (centre update, Sinkhorn-Knopp totals and row sums, the global count of masked patches). Here every such
//! sum goes through a [`Reducer`], so a multi-process backend (NCCL, MPI, TCP, ...) plugs in without touching
//! the losses. [`SingleProcess`] is the one-rank case; [`ThreadGroup`] simulates several ranks inside one
//! process (one thread per rank), which is how the global-batch semantics are tested.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A sum-all-reduce over the ranks of a data-parallel group.
///
/// `all_reduce_sum` is a collective: every rank calls it, in the same order, with tensors of the same shape
/// and dtype, and every rank gets back the element-wise sum over all ranks. Implementations must not keep a
/// gradient graph (the statistics reduced here are computed without gradients). A multi-process backend
/// (NCCL, MPI, TCP, ...) implements this trait and is passed to the losses' `with_reducer`.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{DinoLoss, DinoLossConfig, Reducer, Result};
///
/// /// A test double: one of `n` ranks that all hold the same batch.
/// struct Replicated(usize);
/// impl Reducer for Replicated {
///     fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
///         Ok((t.detach() * self.0 as f64)?)
///     }
///     fn world_size(&self) -> usize {
///         self.0
///     }
/// }
/// // the centre over 4 identical ranks is the centre of one
/// let t = Tensor::new(&[[1f32, 3.0], [3.0, 1.0]], &Device::Cpu)?;
/// let mut one = DinoLoss::new(DinoLossConfig::new(2), &Device::Cpu)?;
/// let mut four = DinoLoss::new(DinoLossConfig::new(2), &Device::Cpu)?.with_reducer(Arc::new(Replicated(4)));
/// for loss in [&mut one, &mut four] {
///     loss.update_center(&t)?;
///     loss.center_mut().apply_pending()?;
/// }
/// assert_eq!(one.center().tensor().to_vec2::<f32>()?, four.center().tensor().to_vec2::<f32>()?);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub trait Reducer: Send + Sync {
    /// Element-wise sum of `t` over all ranks (returned on `t`'s device, in `t`'s dtype).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Number of ranks in the group (1 for a single process).
    fn world_size(&self) -> usize;
}

/// The single-process reducer: the sum over one rank is the tensor itself.
///
/// ```
/// use dinov2_loss::{Reducer, SingleProcess};
/// let t = candle_core::Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu)?;
/// assert_eq!(SingleProcess.world_size(), 1);
/// assert_eq!(SingleProcess.all_reduce_sum(&t)?.to_vec1::<f32>()?, vec![1.0, 2.0]);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Reducer for SingleProcess {
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.detach())
    }
    fn world_size(&self) -> usize {
        1
    }
}

struct Shared {
    n: usize,
    slots: Mutex<Vec<Option<Tensor>>>,
    arrive: Barrier,
    leave: Barrier,
}

/// Several simulated ranks inside one process, one thread per rank.
///
/// [`ThreadGroup::new`] returns one [`ThreadRank`] handle per rank; move each into its own thread. Every rank
/// must make the same sequence of collective calls (as with a real process group), otherwise the threads
/// wait forever. The sum is taken in rank order, so all ranks get bit-identical results.
///
/// ```
/// use dinov2_loss::{Reducer, ThreadGroup};
/// use candle_core::{Device, Tensor};
/// let ranks = ThreadGroup::new(2).unwrap();
/// let handles: Vec<_> = ranks
///     .into_iter()
///     .enumerate()
///     .map(|(i, r)| {
///         std::thread::spawn(move || {
///             let t = Tensor::new(&[i as f32 + 1.0], &Device::Cpu).unwrap();
///             r.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap()
///         })
///     })
///     .collect();
/// for h in handles {
///     assert_eq!(h.join().unwrap(), vec![3.0]);
/// }
/// ```
pub struct ThreadGroup;

impl ThreadGroup {
    /// Creates a group of `n >= 1` ranks and returns their handles, rank 0 first.
    ///
    /// ```
    /// use dinov2_loss::{Error, Reducer, ThreadGroup};
    /// let ranks = dinov2_loss::ThreadGroup::new(3)?;
    /// assert_eq!((ranks.len(), ranks[2].rank(), ranks[2].world_size()), (3, 2, 3));
    /// assert!(matches!(ThreadGroup::new(0), Err(Error::InvalidArgument { name: "n", .. })));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new(n: usize) -> Result<Vec<ThreadRank>> {
        if n == 0 {
            return Err(Error::InvalidArgument {
                name: "n",
                value: 0.0,
                reason: "a thread group needs at least one rank",
            });
        }
        let shared = Arc::new(Shared {
            n,
            slots: Mutex::new(vec![None; n]),
            arrive: Barrier::new(n),
            leave: Barrier::new(n),
        });
        Ok((0..n)
            .map(|rank| ThreadRank {
                shared: shared.clone(),
                rank,
            })
            .collect())
    }
}

/// One rank of a [`ThreadGroup`] (a [`Reducer`]); see [`ThreadGroup`] for an example.
pub struct ThreadRank {
    shared: Arc<Shared>,
    rank: usize,
}

impl ThreadRank {
    /// This handle's rank in `0..world_size`.
    ///
    /// ```
    /// let ranks = dinov2_loss::ThreadGroup::new(2)?;
    /// assert_eq!(ranks.iter().map(|r| r.rank()).collect::<Vec<_>>(), [0, 1]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn rank(&self) -> usize {
        self.rank
    }
}

impl std::fmt::Debug for ThreadRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadRank")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.n)
            .finish()
    }
}

impl Reducer for ThreadRank {
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let rank = self.rank;
        let failed = |reason: &str| Error::Reduce {
            rank,
            reason: reason.to_string(),
        };
        let poisoned = |_| failed("another rank panicked during a collective");
        {
            let mut slots = self.shared.slots.lock().map_err(poisoned)?;
            slots[self.rank] = Some(t.detach());
        }
        self.shared.arrive.wait();
        let result = {
            let slots = self.shared.slots.lock().map_err(poisoned)?;
            let mut acc: Option<Tensor> = None;
            let mut err = None;
            for s in slots.iter() {
                match (s, acc.take()) {
                    (Some(s), None) => acc = Some(s.clone()),
                    (Some(s), Some(a)) => match a.add(s) {
                        Ok(v) => acc = Some(v),
                        Err(e) => {
                            err = Some(Error::from(e));
                            break;
                        }
                    },
                    (None, _) => {
                        err = Some(failed("a rank did not contribute"));
                        break;
                    }
                }
            }
            match (err, acc) {
                (Some(e), _) => Err(e),
                (None, Some(a)) => Ok(a),
                (None, None) => Err(failed("empty group")),
            }
        };
        // Everyone has read every slot before anyone may overwrite its slot in the next collective.
        self.shared.leave.wait();
        result
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }
}

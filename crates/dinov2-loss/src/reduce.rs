//! Global-batch sums of tensors over a [`Communicator`].
//!
//! The official losses sum some statistics over the global batch with `torch.distributed.all_reduce` (centre
//! update, Sinkhorn-Knopp totals and row sums, the global count of masked patches). Here every such sum goes
//! through [`all_reduce_sum`] on the workspace's one collective interface, [`dinov2_dist::Communicator`]:
//! [`SingleProcess`] by default, a [`ThreadGroup`] rank in tests, `Mpi` under `mpirun` (passed to the losses'
//! `with_communicator`).

use candle_core::{DType, Tensor};
pub use dinov2_dist::{Communicator, SingleProcess, ThreadGroup, ThreadRank};

use crate::error::Result;

/// Element-wise sum of `t` over the ranks of `comm`, on `t`'s device, in `t`'s dtype, without a gradient graph.
///
/// A collective: every rank calls it in the same order with tensors of the same shape. One rank returns `t`
/// detached; otherwise the values travel through host memory as f64 (f64 tensors) or f32 (every other dtype, which
/// covers the f32/bf16/f16 statistics of the losses: they are at most `K` prototypes long).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{all_reduce_sum, Communicator, ThreadGroup};
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let hs: Vec<_> = ThreadGroup::new(2)
///         .unwrap()
///         .into_iter()
///         .map(|r| s.spawn(move || {
///             let t = Tensor::new(&[r.rank() as f32 + 1.0, 10.0], &Device::Cpu).unwrap();
///             all_reduce_sum(&r, &t).unwrap().to_vec1::<f32>().unwrap()
///         }))
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(sums, vec![vec![3.0, 20.0], vec![3.0, 20.0]]);
/// ```
pub fn all_reduce_sum(comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    if comm.world_size() == 1 {
        return Ok(t);
    }
    let (shape, dtype, device) = (t.shape().clone(), t.dtype(), t.device().clone());
    let out = if dtype == DType::F64 {
        let mut v = t.flatten_all()?.to_vec1::<f64>()?;
        comm.all_reduce_sum_f64(&mut v)?;
        Tensor::from_vec(v, shape, &device)?
    } else {
        let mut v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        comm.all_reduce_sum_f32(&mut v)?;
        Tensor::from_vec(v, shape, &device)?.to_dtype(dtype)?
    };
    Ok(out)
}

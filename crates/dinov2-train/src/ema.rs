//! The teacher's exponential moving average of the student (`SSLMetaArch.update_teacher`).

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `teacher ← teacher·m + student·(1 − m)` for every pair, in PyTorch's order of operations
/// (`_foreach_mul_(teacher, m)`, then `_foreach_add_(teacher, student, alpha=1-m)`), in place.
///
/// ```
/// use candle_core::{Device, Var};
/// let t = Var::new(&[1f32, 2.0], &Device::Cpu)?;
/// let s = Var::new(&[3f32, 4.0], &Device::Cpu)?;
/// dinov2_train::ema::update_teacher(&[(t.clone(), s)], 0.75)?;
/// assert_eq!(t.as_tensor().to_vec1::<f32>()?, [1.5, 2.5]);
/// # Ok::<(), dinov2_train::Error>(())
/// ```
pub fn update_teacher(pairs: &[(Var, Var)], momentum: f64) -> Result<()> {
    let op = Ema {
        m: momentum as f32,
        alpha: (1.0 - momentum) as f32,
    };
    for (t, s) in pairs {
        if t.shape() != s.shape() || t.dtype() != DType::F32 || s.dtype() != DType::F32 {
            return Err(Error::InvalidArgument {
                name: "pairs",
                reason: format!(
                    "teacher {:?} {:?} and student {:?} {:?} must be f32 of one shape",
                    t.shape(),
                    t.dtype(),
                    s.shape(),
                    s.dtype()
                ),
            });
        }
        match t.device() {
            Device::Cpu => t
                .as_tensor()
                .inplace_op2(&s.as_tensor().contiguous()?, &op)?,
            _ => {
                let new = ((t.as_tensor() * momentum)? + (s.as_tensor() * (1.0 - momentum))?)?;
                t.set(&new)?;
            }
        }
    }
    Ok(())
}

struct Ema {
    m: f32,
    alpha: f32,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "ema"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (t, s) = crate::optim::f32_slices("ema", s1, l1, s2, l2)?;
        let (m, alpha) = (self.m, self.alpha);
        t.par_chunks_mut(1 << 14)
            .zip(s.par_chunks(1 << 14))
            .for_each(|(t, s)| {
                for (t, &s) in t.iter_mut().zip(s) {
                    *t = *t * m + alpha * s;
                }
            });
        Ok(())
    }
}

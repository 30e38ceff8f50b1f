//! The training step and loop (`train/train.py: do_train`).
//!
//! [`Trainer`] owns everything that changes during a run (the meta-architecture, AdamW, the iteration, the
//! stochastic-depth generator, the data position) and runs one official iteration per [`Trainer::step`]:
//! schedules → `forward_backward` → per-submodule clipping → AdamW → EMA teacher.
//!
//! Data-parallel ([`Trainer::with_communicator`]): every rank runs its own `Trainer` on its shard of the global
//! batch; between `forward_backward` and clipping the student's gradients are averaged over the ranks
//! ([`crate::data_parallel`]), the loss's centring and Sinkhorn-Knopp sums go over the ranks, and the ranks keep
//! bit-identical weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use dinov2_data::rand::SeedableRng;
use dinov2_data::rand_chacha::ChaCha8Rng;

use crate::checkpoint::{self, RngState, TrainerState};
use crate::data_parallel::DataParallel;
use crate::error::{Error, Result};
use crate::meta_arch::{LossValues, SslMetaArch, StepBatch, SUBMODULES};
use crate::optim::{clip_coefficients, AdamW, AdamWConfig, StepSettings};
use crate::param_groups::param_group;
use crate::schedules::{ScheduleConfig, ScheduleValues, Schedules};
use dinov2_dist::Communicator;

/// The optimisation settings of a run (the `optim` and `teacher` config sections).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimSettings {
    /// The schedules.
    pub schedules: ScheduleConfig,
    /// AdamW's betas and eps.
    pub adamw: AdamWConfig,
    /// `optim.layerwise_decay`.
    pub layerwise_decay: f64,
    /// `optim.patch_embed_lr_mult`.
    pub patch_embed_lr_mult: f64,
    /// `optim.clip_grad` (0: no clipping).
    pub clip_grad: f64,
}

/// What one iteration did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The iteration that ran.
    pub iteration: u64,
    /// Its loss terms.
    pub losses: LossValues,
    /// The schedule values it used.
    pub schedule: ScheduleValues,
    /// Pre-clipping gradient norm of each student submodule.
    pub grad_norms: Vec<(&'static str, f64)>,
}

/// One training run's mutable state (see the [module docs](self)).
pub struct Trainer {
    arch: SslMetaArch,
    optimizer: AdamW,
    schedules: Schedules,
    clip_grad: f64,
    rng: ChaCha8Rng,
    iteration: u64,
    sampler_position: u64,
    /// For each submodule present: its index in [`SUBMODULES`] and its parameters (clipping groups).
    groups: Vec<(usize, Vec<Tensor>)>,
    /// Data-parallel over more than one rank (`None`: a single process, no collective at all).
    dp: Option<DataParallel>,
    /// The student's parameters in name order, taken once when data-parallel training starts (what every step's
    /// gradient all-reduce walks).
    dp_params: Vec<(String, Var)>,
    /// Every rank's sampler position, rank order (gathered by [`Self::gather_sampler_positions`]).
    rank_sampler_positions: Vec<u64>,
}

impl Trainer {
    /// A run at iteration 0 over `arch` (its student's parameters in the official groups), with the
    /// stochastic-depth generator seeded by `seed`.
    pub fn new(arch: SslMetaArch, settings: &OptimSettings, seed: u64) -> Result<Self> {
        let schedules = Schedules::new(&settings.schedules)?;
        let depth = arch.config().student.depth;
        let mut params = Vec::new();
        let mut groups: Vec<(usize, Vec<Tensor>)> = Vec::new();
        for (name, var) in arch.student_parameters() {
            let sub = SslMetaArch::submodule_of(&name);
            let idx = SUBMODULES.iter().position(|s| *s == sub).ok_or_else(|| {
                Error::InvalidArgument {
                    name: "arch",
                    reason: format!("parameter `{name}` is in no known submodule"),
                }
            })?;
            let rel = &name[sub.len() + 1..];
            let n_blocks = if idx == 0 { depth } else { 0 };
            let group = param_group(
                rel,
                n_blocks,
                settings.layerwise_decay,
                settings.patch_embed_lr_mult,
            );
            match groups.iter_mut().find(|(i, _)| *i == idx) {
                Some((_, g)) => g.push(var.as_tensor().clone()),
                None => groups.push((idx, vec![var.as_tensor().clone()])),
            }
            params.push((name, var, group));
        }
        groups.sort_by_key(|(i, _)| *i);
        Ok(Self {
            arch,
            optimizer: AdamW::new(params, settings.adamw),
            schedules,
            clip_grad: settings.clip_grad,
            rng: ChaCha8Rng::seed_from_u64(dinov2_data::sampler::mix_seed(&[seed, 0x6472_6f70])),
            iteration: 0,
            sampler_position: 0,
            groups,
            dp: None,
            dp_params: Vec::new(),
            rank_sampler_positions: Vec::new(),
        })
    }

    /// Data-parallel training over `comm` with the default buckets: see [`Self::with_data_parallel`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::Device;
    /// use dinov2_dist::Communicator;
    /// use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig};
    /// use dinov2_train::meta_arch::{SslMetaArch, SslMetaArchConfig};
    /// use dinov2_train::trainer::{OptimSettings, Trainer};
    /// let mut vit = dinov2_model::VitConfig::vit_small();
    /// (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) = (32, 1, 2, 28);
    /// let cfg = SslMetaArchConfig {
    ///     student: vit,
    ///     dino_head: DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 16, ..DinoHeadConfig::new(32, 64) },
    ///     ibot_head: None,
    ///     loss: DinoV2LossConfig::new(64, 64),
    /// };
    /// let settings = OptimSettings {
    ///     schedules: dinov2_train::schedules::ScheduleConfig {
    ///         epochs: 4, epoch_length: 3, warmup_epochs: 1, warmup_teacher_temp_epochs: 2,
    ///         ..dinov2_train::schedules::ScheduleConfig::official()
    ///     },
    ///     adamw: Default::default(),
    ///     layerwise_decay: 0.9,
    ///     patch_embed_lr_mult: 0.2,
    ///     clip_grad: 3.0,
    /// };
    /// // two ranks in one process, initialised differently: rank 0's weights win
    /// let same = std::thread::scope(|s| {
    ///     let hs: Vec<_> = dinov2_dist::ThreadGroup::new(2)?
    ///         .into_iter()
    ///         .map(|r| {
    ///             let (cfg, settings) = (cfg.clone(), settings.clone());
    ///             s.spawn(move || -> dinov2_train::Result<Vec<f32>> {
    ///                 let arch = SslMetaArch::new(cfg, r.rank() as u64, &Device::Cpu)?;
    ///                 let t = Trainer::new(arch, &settings, 0)?.with_communicator(Arc::new(r))?;
    ///                 let (_, w) = &t.arch().student_parameters()[0];
    ///                 Ok(w.as_tensor().flatten_all()?.to_vec1()?)
    ///             })
    ///         })
    ///         .collect();
    ///     let w: Vec<Vec<f32>> = hs.into_iter().map(|h| h.join().unwrap()).collect::<dinov2_train::Result<_>>()?;
    ///     Ok::<_, dinov2_train::Error>(w[0] == w[1])
    /// })?;
    /// assert!(same);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn with_communicator(self, comm: Arc<dyn Communicator>) -> Result<Self> {
        self.with_data_parallel(DataParallel::new(comm))
    }

    /// Data-parallel training: this trainer is rank `dp.rank()` of `dp.world_size()`, each rank stepping on its
    /// own part of the global batch (a collective: every rank calls it, with the same configuration).
    ///
    /// The loss's centring and Sinkhorn-Knopp sums go over the ranks; the student and teacher weights are
    /// broadcast from rank 0 (the ranks start identical even where their initialisations differed); each
    /// [`Self::step`] averages the gradients over the ranks before clipping, and its reported losses are the
    /// means over the ranks. With one rank nothing changes (no collective is ever called).
    pub fn with_data_parallel(mut self, dp: DataParallel) -> Result<Self> {
        if dp.world_size() == 1 {
            self.dp = None;
            self.dp_params.clear();
            return Ok(self);
        }
        let student = self.arch.student_parameters();
        dp.check_layout(&student)?;
        let loss = self
            .arch
            .loss()
            .clone()
            .with_communicator(dp.communicator().clone());
        *self.arch.loss_mut() = loss;
        self.dp_params = student.clone();
        let mut all = student;
        all.extend(
            self.arch
                .teacher_parameters()
                .into_iter()
                .map(|(k, v)| (format!("teacher.{k}"), v)),
        );
        dp.broadcast_parameters(&all, 0)?;
        self.dp = Some(dp);
        Ok(self)
    }

    /// The data-parallel group, when there is more than one rank.
    pub fn data_parallel(&self) -> Option<&DataParallel> {
        self.dp.as_ref()
    }

    /// This trainer's rank (0 in a single process).
    pub fn rank(&self) -> usize {
        self.dp.as_ref().map_or(0, DataParallel::rank)
    }

    /// Number of data-parallel ranks (1 in a single process).
    pub fn world_size(&self) -> usize {
        self.dp.as_ref().map_or(1, DataParallel::world_size)
    }

    /// The next iteration to run (= completed iterations).
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The total number of iterations (`epochs × OFFICIAL_EPOCH_LENGTH`).
    pub fn max_iter(&self) -> u64 {
        self.schedules.max_iter()
    }

    /// The data sampler's position after the last batch consumed.
    pub fn sampler_position(&self) -> u64 {
        self.sampler_position
    }

    /// Records the data sampler's position after the batch of the step just run (saved in checkpoints).
    pub fn set_sampler_position(&mut self, position: u64) {
        self.sampler_position = position;
    }

    /// The meta-architecture.
    pub fn arch(&self) -> &SslMetaArch {
        &self.arch
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The schedules.
    pub fn schedules(&self) -> &Schedules {
        &self.schedules
    }

    /// One official iteration on `batch`. A non-finite loss is refused before any parameter changes
    /// ([`Error::NonFiniteLoss`]).
    ///
    /// Data-parallel, `batch` is this rank's part of the global batch (every rank the same size, for the
    /// gradient mean to be the global batch's); the losses are averaged over the ranks before the finiteness
    /// check, so every rank refuses a step that is non-finite on any of them.
    pub fn step(&mut self, batch: &StepBatch) -> Result<StepReport> {
        let it = self.iteration;
        let sv = self.schedules.at(it);
        let mut out = self
            .arch
            .forward_backward(batch, sv.teacher_temp, &mut self.rng)?;
        if let Some(dp) = &self.dp {
            out.losses = average_losses(dp, &out.losses)?;
        }
        if !out.losses.is_finite() {
            return Err(Error::NonFiniteLoss {
                iteration: it,
                terms: format_terms(&out.losses),
                last_checkpoint: None,
            });
        }
        if let Some(dp) = &self.dp {
            dp.all_reduce_gradients(&mut out.grads, &self.dp_params)?;
        }
        let mut scale: HashMap<&'static str, f64> = HashMap::new();
        let mut grad_norms = Vec::new();
        let tensors: Vec<Vec<Tensor>> = self.groups.iter().map(|(_, g)| g.clone()).collect();
        let max_norm = if self.clip_grad > 0.0 {
            self.clip_grad
        } else {
            f64::INFINITY
        };
        for ((idx, _), (norm, coef)) in self
            .groups
            .iter()
            .zip(clip_coefficients(&out.grads, &tensors, max_norm)?)
        {
            scale.insert(SUBMODULES[*idx], coef);
            grad_norms.push((SUBMODULES[*idx], norm));
        }
        let settings = StepSettings {
            lr: sv.lr,
            last_layer_lr: sv.last_layer_lr,
            weight_decay: sv.weight_decay,
        };
        self.optimizer.step(&out.grads, &settings, |name| {
            scale
                .get(SslMetaArch::submodule_of(name))
                .copied()
                .unwrap_or(1.0)
        })?;
        drop(out.grads);
        self.arch.update_teacher(sv.momentum)?;
        self.iteration += 1;
        Ok(StepReport {
            iteration: it,
            losses: out.losses,
            schedule: sv,
            grad_norms,
        })
    }

    /// The DINO and iBOT centres with any pending update folded in (what the next step will use; folding
    /// early gives the same values bit for bit).
    pub fn centers_after_update(&mut self) -> Result<(Tensor, Option<Tensor>)> {
        let loss = self.arch.loss_mut();
        loss.dino_loss_mut().center_mut().apply_pending()?;
        let dino = loss.dino_loss().center().tensor().clone();
        let ibot = match loss.ibot_loss_mut() {
            Some(l) => {
                l.center_mut().apply_pending()?;
                Some(l.center().tensor().clone())
            }
            None => None,
        };
        Ok((dino, ibot))
    }

    /// Data-parallel, before a checkpoint (a collective; nothing with one rank): gathers every rank's sampler
    /// position (saved with the checkpoint) and checks that every rank holds the same student, teacher and
    /// centres ([`Error::RanksOutOfSync`] otherwise). Then rank 0 alone calls [`Self::save`].
    pub fn prepare_checkpoint(&mut self) -> Result<()> {
        let Some(dp) = self.dp.clone() else {
            return Ok(());
        };
        let positions = dp
            .communicator()
            .all_gather_i64(&[self.sampler_position as i64])?;
        self.rank_sampler_positions = positions.into_iter().map(|p| p as u64).collect();
        let (dino, ibot) = self.centers_after_update()?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (prefix, params) in [
            ("student.", self.arch.student_parameters()),
            ("teacher.", self.arch.teacher_parameters()),
        ] {
            tensors.extend(
                params
                    .into_iter()
                    .map(|(k, v)| (format!("{prefix}{k}"), v.as_tensor().clone())),
            );
        }
        tensors.push(("dino_loss.center".into(), dino));
        if let Some(c) = ibot {
            tensors.push(("ibot_patch_loss.center".into(), c));
        }
        dp.check_in_sync(
            "student/teacher weights or centres",
            self.iteration,
            &tensors,
        )
    }

    /// Saves a full checkpoint under `dir` (see [`checkpoint`]) and returns its path. Data-parallel: rank 0 saves
    /// (after [`Self::prepare_checkpoint`] on every rank), with every rank's sampler position.
    pub fn save(&mut self, dir: impl AsRef<Path>) -> Result<PathBuf> {
        let state = TrainerState {
            version: 1,
            iteration: self.iteration,
            sampler_position: self.sampler_position,
            drop_path_rng: RngState::of(&self.rng),
            rank_sampler_positions: if self.rank_sampler_positions.len() == self.world_size() {
                self.rank_sampler_positions.clone()
            } else {
                Vec::new()
            },
        };
        checkpoint::save(dir, &mut self.arch, &self.optimizer, &state)
    }

    /// Restores the checkpoint at `path` (written by [`Self::save`] for the same configuration, with any
    /// number of ranks). Data-parallel, every rank reads the same checkpoint; the sampler position is this
    /// rank's own when the checkpoint was written by as many ranks, else the position of the writer's rank 0
    /// (with another world size the ranks' shards of the dataset differ, so the data order is a new one from that
    /// point: each rank resumes its new shard at that position, the model and optimiser state exactly).
    pub fn restore(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let state = checkpoint::load(path, &mut self.arch, &mut self.optimizer)?;
        self.rng = state.drop_path_rng.restore()?;
        self.iteration = state.iteration;
        self.sampler_position = if state.rank_sampler_positions.len() == self.world_size() {
            state.rank_sampler_positions[self.rank()]
        } else {
            state.sampler_position
        };
        self.rank_sampler_positions = state.rank_sampler_positions;
        Ok(())
    }
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("iteration", &self.iteration)
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

/// The loss terms' means over the ranks (one all-reduce of five values).
fn average_losses(dp: &DataParallel, l: &LossValues) -> Result<LossValues> {
    let terms = [l.dino_local, l.dino_global, l.koleo, l.ibot];
    let mut v: Vec<f64> = terms.iter().map(|t| t.unwrap_or(0.0)).collect();
    v.push(l.total);
    dp.average(&mut v)?;
    let back = |i: usize| terms[i].map(|_| v[i]);
    Ok(LossValues {
        dino_local: back(0),
        dino_global: back(1),
        koleo: back(2),
        ibot: back(3),
        total: v[4],
    })
}

/// `name=value` pairs of the official log names.
pub fn format_terms(l: &LossValues) -> String {
    let mut parts: Vec<String> = l
        .official_log()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.push(format!("total={}", l.total));
    parts.join(" ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::meta_arch::SslMetaArchConfig;
    use candle_core::{DType, Device};
    use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig};

    /// A tiny run: 32 wide, 2 blocks, patch 14, 28-pixel globals (2x2 patches), 14-pixel locals, drop path.
    pub(crate) fn tiny_trainer(seed: u64, separate_ibot: bool) -> Trainer {
        let mut vit = dinov2_model::VitConfig::vit_small();
        (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) = (32, 2, 2, 28);
        (vit.drop_path_rate, vit.drop_path_uniform) = (0.4, true);
        vit.layer_scale_init = Some(1e-5);
        let head = |k| DinoHeadConfig {
            hidden_dim: 32,
            bottleneck_dim: 16,
            ..DinoHeadConfig::new(32, k)
        };
        let cfg = SslMetaArchConfig {
            student: vit,
            dino_head: head(64),
            ibot_head: separate_ibot.then(|| head(48)),
            loss: DinoV2LossConfig::new(64, if separate_ibot { 48 } else { 64 }),
        };
        let arch = SslMetaArch::new(cfg, seed, &Device::Cpu).unwrap();
        Trainer::new(arch, &tiny_settings(), seed).unwrap()
    }

    /// The optimisation of [`tiny_trainer`]: 4 epochs of 3 iterations, strong clipping.
    pub(crate) fn tiny_settings() -> OptimSettings {
        OptimSettings {
            schedules: ScheduleConfig {
                lr: 1e-3,
                epochs: 4,
                epoch_length: 3,
                warmup_epochs: 1,
                warmup_teacher_temp_epochs: 2,
                ..ScheduleConfig::official()
            },
            adamw: AdamWConfig::default(),
            layerwise_decay: 0.9,
            patch_embed_lr_mult: 0.2,
            clip_grad: 0.05,
        }
    }

    /// Deterministic batch `i` (B = 2, 2 local crops).
    pub(crate) fn batch(i: u64) -> StepBatch {
        let dev = Device::Cpu;
        let img = |n: usize, s: usize, phase: f64| {
            Tensor::arange(0f32, (n * 3 * s * s) as f32, &dev)
                .unwrap()
                .affine(0.013 * (1.0 + i as f64), phase)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((n, 3, s, s))
                .unwrap()
        };
        let m = (i % 4) as u8;
        let masks = Tensor::new(
            &[
                [1u8, 1, 0, 0],
                [0, 0, 0, 0],
                [0, 0, m.min(1), 0],
                [0, 1, 0, 1],
            ],
            &dev,
        )
        .unwrap();
        let idx = dinov2_loss::mask_indices(&masks).unwrap();
        StepBatch {
            global_crops: img(4, 28, 0.1 * i as f64),
            local_crops: Some(img(4, 14, 1.0)),
            masks,
            mask_indices: idx.to_dtype(DType::U32).unwrap(),
        }
    }

    fn teacher_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
        t.arch()
            .teacher_parameters()
            .into_iter()
            .map(|(k, v)| {
                let bits = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect();
                (k, bits)
            })
            .collect()
    }

    #[test]
    fn stop_and_resume_is_bit_identical() {
        for separate in [false, true] {
            let (n, m) = (3, 3);
            let mut straight = tiny_trainer(7, separate);
            for i in 0..n + m {
                straight.step(&batch(i)).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let mut first = tiny_trainer(7, separate);
            for i in 0..n {
                first.step(&batch(i)).unwrap();
            }
            first.set_sampler_position(123);
            let path = first.save(dir.path()).unwrap();
            drop(first);
            let mut resumed = tiny_trainer(99, separate); // another init: everything comes from the file
            resumed.restore(&path).unwrap();
            assert_eq!((resumed.iteration(), resumed.sampler_position()), (n, 123));
            for i in n..n + m {
                resumed.step(&batch(i)).unwrap();
            }
            assert!(
                teacher_bits(&straight) == teacher_bits(&resumed),
                "separate={separate}"
            );
            let s: Vec<_> = straight
                .optimizer()
                .params()
                .iter()
                .map(|p| p.state.clone())
                .collect();
            let r: Vec<_> = resumed
                .optimizer()
                .params()
                .iter()
                .map(|p| p.state.clone())
                .collect();
            assert!(s == r);
        }
    }

    #[test]
    fn a_non_finite_loss_changes_nothing() {
        let mut t = tiny_trainer(1, false);
        t.step(&batch(0)).unwrap();
        let before = teacher_bits(&t);
        let mut bad = batch(1);
        bad.global_crops = (bad.global_crops * f64::NAN).unwrap();
        let err = t.step(&bad).unwrap_err();
        assert!(
            matches!(err, Error::NonFiniteLoss { iteration: 1, .. }),
            "{err}"
        );
        assert_eq!(t.iteration(), 1);
        assert!(before == teacher_bits(&t));
    }

    #[test]
    fn clipping_and_freezing_follow_the_schedules() {
        let mut t = tiny_trainer(3, true);
        let last = |t: &Trainer| -> Vec<f32> {
            let (_, v) = t
                .arch()
                .student_parameters()
                .into_iter()
                .find(|(k, _)| k == "dino_head.last_layer.weight_v")
                .unwrap();
            v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
        };
        let v0 = last(&t);
        let r = t.step(&batch(0)).unwrap();
        assert_eq!(r.schedule.last_layer_lr, 0.0);
        assert_eq!(v0, last(&t), "the last layer is frozen in the first epoch");
        assert_eq!(
            r.grad_norms.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["backbone", "dino_head", "ibot_head"]
        );
        for _ in 1..3 {
            t.step(&batch(1)).unwrap();
        }
        t.step(&batch(3)).unwrap(); // iteration 3: the second epoch
        assert_ne!(v0, last(&t));
    }
}

#[cfg(test)]
mod empty_mask_tests {
    use super::tests::{batch, tiny_trainer};
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn a_batch_without_masked_patches_trains() {
        for separate in [false, true] {
            let mut t = tiny_trainer(2, separate);
            let mut b = batch(0);
            b.masks = Tensor::zeros((4, 4), DType::U8, &Device::Cpu).unwrap();
            b.mask_indices = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
            let r = t.step(&b).unwrap();
            assert!(r.losses.is_finite(), "{:?}", r.losses);
            assert_eq!(r.losses.ibot, Some(0.0));
            t.step(&batch(1)).unwrap();
        }
    }
}

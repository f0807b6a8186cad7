//! The training loop of [`super::fit_distributed`], in its named steps: [`Run::start`] (fresh or
//! resumed from the last checkpoint), then per epoch [`Run::train_epoch`] (batches, optimizer
//! steps, recovery checkpoints) and [`Run::finish_epoch`] (evaluation, the choice on validation,
//! the epoch's checkpoints).

use super::checkpoint::{self, Checkpoint, CheckpointMeta, PartialEpoch};
use super::{
    agree_on_start, append_line, checksum, clip_grad_norm, eta, evaluate_distributed, optimizer,
    reduce_gradients, remove_stale_temporaries, sync_from_rank0, BatchProgress, CheckpointEvent,
    CheckpointKind, Classifier, Ema, EpochEnd, EpochMetrics, EpochStart, FitSummary,
    GradAccumulator, Notice, Observer, Optimizer, RunPaths, Schedule, Selection, StepEvent,
    TrainConfig, NOISE_STREAM,
};
use crate::data::{EpochReport, Loader};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use std::time::Instant;

/// A run's inputs and what follows from them, fixed for its length.
pub(super) struct Run<'a, M: Classifier> {
    pub model: &'a M,
    pub varmap: &'a VarMap,
    pub train: &'a Loader,
    pub validation: Option<&'a Loader>,
    pub cfg: &'a TrainConfig,
    pub device: &'a Device,
    pub world: &'a dyn candle_ddp::Collective,
    pub paths: RunPaths,
    rank: usize,
    ranks: usize,
    /// Rank 0 writes checkpoints and metrics.
    writer: bool,
    /// Micro-batches per epoch (at most `max_batches_per_epoch`).
    batches: usize,
    schedule: Schedule,
    data_signature: checkpoint::DataSignature,
    /// The variables by name: the order every rank packs gradients and values in.
    vars: Vec<(String, candle_core::Var)>,
    loss_fn: candle_xent::CrossEntropyLoss,
    soft_loss: candle_xent::CrossEntropyLoss,
    run_start: Instant,
}

/// What a run changes as it goes.
pub(super) struct State {
    opt: Optimizer,
    ema: Option<Ema>,
    acc: GradAccumulator,
    /// Optimizer steps taken, restored ones included.
    step: u64,
    /// `step` when this invocation started (for its time estimates).
    first_step: u64,
    pub summary: FitSummary,
    last_checkpoint: Instant,
}

/// The training half of an epoch, as [`Run::finish_epoch`] needs it.
pub(super) struct Trained {
    t0: Instant,
    loss_sum: f64,
    loss_n: usize,
    images: usize,
    lr: f64,
    data_wait_s: f64,
    skipped: usize,
    seconds_before: f64,
    /// Asked to stop (the observer, a signal), and whether the epoch's last batch was reached.
    pub stop: bool,
    pub epoch_done: bool,
    report: EpochReport,
}

impl<'a, M: Classifier> Run<'a, M> {
    /// The run's fixed parts; `paths.dir` is created.
    #[allow(clippy::too_many_arguments)] // each argument is a distinct input of the run
    pub fn new(
        model: &'a M,
        varmap: &'a VarMap,
        train: &'a Loader,
        validation: Option<&'a Loader>,
        cfg: &'a TrainConfig,
        device: &'a Device,
        world: &'a dyn candle_ddp::Collective,
        paths: RunPaths,
    ) -> Result<Self> {
        let (rank, ranks) = (world.rank(), world.world_size());
        if ranks > 1 {
            let want = crate::data::Shard { rank, world: ranks };
            if train.shard() != want {
                bail!(
                    "train: the training loader is shard {:?}, but this process is rank {rank} of \
                     {ranks}: give the loader LoaderConfig {{ shard: {want:?}, .. }}",
                    train.shard()
                );
            }
        }
        std::fs::create_dir_all(&paths.dir)?;
        let batches = train
            .num_batches()
            .min(cfg.max_batches_per_epoch.unwrap_or(usize::MAX));
        let steps_per_epoch = batches.div_ceil(cfg.accum_steps).max(1);
        let schedule = Schedule {
            base_lr: cfg.lr,
            warmup: (cfg.warmup_epochs * steps_per_epoch as f64).round() as u64,
            total: (cfg.epochs * steps_per_epoch) as u64,
            decay: cfg.decay(steps_per_epoch),
        };
        let mut vars: Vec<(String, candle_core::Var)> = {
            let d = varmap.data().lock().expect("VarMap lock poisoned");
            d.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            model,
            varmap,
            train,
            validation,
            cfg,
            device,
            world,
            paths,
            rank,
            ranks,
            writer: rank == 0,
            batches,
            schedule,
            data_signature: checkpoint::DataSignature {
                images: train.dataset().len(),
                classes: train.dataset().class_names.clone(),
            },
            vars,
            loss_fn: candle_xent::CrossEntropyLoss::new().label_smoothing(cfg.label_smoothing),
            soft_loss: candle_xent::CrossEntropyLoss::new(),
            run_start: Instant::now(),
        })
    }

    /// The run's state at its start: fresh, or (with `resume`) the last checkpoint's, checked to
    /// belong to this configuration and data; also the first epoch to run and the partial epoch
    /// to continue. Every rank then holds rank 0's values.
    pub fn start(
        &self,
        resume: bool,
        observer: &mut dyn Observer,
    ) -> Result<(State, usize, Option<PartialEpoch>)> {
        let (cfg, paths) = (self.cfg, &self.paths);
        let mut opt = optimizer(cfg, self.varmap)?;
        let mut summary = FitSummary {
            selected_on: match self.validation {
                Some(_) => Selection::Validation,
                None => Selection::LastEpoch,
            },
            ..Default::default()
        };
        let (mut start_epoch, mut step) = (0, 0);
        remove_stale_temporaries(&paths.dir);
        let mut partial: Option<PartialEpoch> = None;
        // The weight EMA's values in the checkpoint resumed from (read with it, once).
        let mut stored_ema: Vec<(String, Tensor)> = Vec::new();
        let resume = resume && {
            let found = paths.last().exists();
            if !found {
                observer.notice(&Notice::NothingToResume {
                    dir: paths.dir.clone(),
                });
            }
            found
        };
        if self.ranks > 1 {
            agree_on_start(self.world, resume, self.device, &paths.last())?;
        }
        if resume {
            let ck = Checkpoint::load(&paths.last())?;
            self.check_resumable(&ck)?;
            ck.restore(self.varmap, &mut opt)?;
            stored_ema = ck.ema_values();
            start_epoch = ck.meta.epoch;
            step = ck.meta.step;
            summary.history = ck.meta.history.clone();
            summary.best_epoch = ck.meta.best_epoch;
            summary.best = ck.meta.best.clone();
            summary.best_is_ema = ck.meta.best_is_ema;
            partial = ck.meta.partial.clone();
            // metrics.jsonl says what the checkpoint says: a line appended by an epoch that was
            // killed before its checkpoint is dropped (that epoch runs again).
            let mut lines = String::new();
            for m in &summary.history {
                lines += &serde_json::to_string(m).map_err(candle_core::Error::wrap)?;
                lines.push('\n');
            }
            if self.writer {
                crate::files::atomic_write_bytes(&paths.metrics(), lines.as_bytes())?;
            }
            if let Some(p) = &partial {
                observer.notice(&Notice::Resumed {
                    epoch: start_epoch + 1,
                    batch: p.batches,
                    step,
                });
            }
        } else if self.writer {
            let _ = std::fs::remove_file(paths.metrics());
        }
        // A finished run resumed: nothing more to set up.
        let finished = start_epoch >= cfg.epochs;
        // Every rank starts from rank 0's values (initialisation or checkpoint alike).
        if self.ranks > 1 && !finished {
            let all: Vec<usize> = (0..self.vars.len()).collect();
            sync_from_rank0(self.world, &self.vars, &all)?;
        }
        // The weight EMA: from the checkpoint when resuming, else the model as it starts.
        let ema = if cfg.model_ema && !finished {
            Some(if stored_ema.is_empty() {
                Ema::new(self.varmap, cfg.model_ema_decay, cfg.model_ema_warmup)?
            } else {
                Ema::from_values(cfg.model_ema_decay, cfg.model_ema_warmup, stored_ema)
            })
        } else {
            None
        };
        let state = State {
            opt,
            ema,
            acc: GradAccumulator::new(self.vars.clone()),
            step,
            first_step: step,
            summary,
            last_checkpoint: Instant::now(),
        };
        Ok((state, start_epoch, partial))
    }

    /// Another configuration or other data would not continue the checkpoint's run but start a
    /// different one from its middle.
    fn check_resumable(&self, ck: &Checkpoint) -> Result<()> {
        let (paths, sig) = (&self.paths, &self.data_signature);
        let diff = ck.meta.config.resume_differences(self.cfg);
        if !diff.is_empty() {
            bail!(
                "train: cannot resume from {}: the run there used other settings ({}); resume \
                 with the same ones (only lr, eval_every, stop_after_epoch and the checkpoint \
                 intervals may change) or write to another folder",
                paths.last().display(),
                diff.join(", ")
            );
        }
        if let Some(d) = &ck.meta.data {
            if d != sig {
                bail!(
                    "train: cannot resume from {}: the run there trained on other data ({} \
                     images, {} classes; now {} images, {} classes{}); resume on the same \
                     data or write to another folder",
                    paths.last().display(),
                    d.images,
                    d.classes.len(),
                    sig.images,
                    sig.classes.len(),
                    if d.classes != sig.classes && d.classes.len() == sig.classes.len() {
                        ", other class names"
                    } else {
                        ""
                    }
                );
            }
        }
        Ok(())
    }

    /// Seconds left in the run at this invocation's rate.
    fn run_eta(&self, st: &State) -> Option<f64> {
        eta(
            self.run_start.elapsed().as_secs_f64(),
            st.step - st.first_step,
            self.schedule.total - st.step,
        )
    }

    /// Trains epoch `epoch` (0-based) from its first batch, or after the batches of `resumed`:
    /// forward and backward per micro-batch, an optimizer step per group, a recovery checkpoint
    /// when one is due or the run is asked to stop (the loop then ends after that step).
    pub fn train_epoch(
        &self,
        st: &mut State,
        epoch: usize,
        resumed: Option<PartialEpoch>,
        observer: &mut dyn Observer,
    ) -> Result<Trained> {
        let (cfg, batches, ranks) = (self.cfg, self.batches, self.ranks);
        let (train, model, device) = (self.train, self.model, self.device);
        let t0 = Instant::now();
        // A recovery checkpoint of this epoch: continue after its last batch, with its sums.
        let resumed = resumed.unwrap_or(PartialEpoch {
            batches: 0,
            loss_sum: 0.0,
            steps: 0,
            images: 0,
            skipped: 0,
            seconds: 0.0,
        });
        let first_batch = resumed.batches.min(batches);
        observer.epoch_start(&EpochStart {
            epoch: epoch + 1,
            epochs: cfg.epochs,
            batches,
            first_batch,
        });
        let mut it = train.epoch_from(epoch as u64, first_batch);
        let (train_len, train_batch) = (train.dataset().len(), train.batch_size());
        let (mut loss_sum, mut loss_n, mut images) =
            (resumed.loss_sum, resumed.steps, resumed.images);
        let mut step_loss = 0.0;
        let mut group_images = 0usize;
        // Positions in the current group (data-parallel ranks end groups by position, the same
        // on every rank, not by the micro-batches they happened to get).
        let mut group_positions = 0usize;
        let mut lr = self.schedule.lr(st.step);
        let mut stop = false;
        let mut data_wait_s = 0.0;
        let mut skipped = resumed.skipped;
        let seconds_before = resumed.seconds;
        let mut next_position = first_batch;
        let mut epoch_done = first_batch >= batches;
        loop {
            let waited = Instant::now();
            let Some(batch) = it.next() else { break };
            data_wait_s += waited.elapsed().as_secs_f64();
            let batch = batch?;
            let bi = batch.position;
            if bi >= batches {
                break;
            }
            // Images that could not be decoded (the loader leaves them out, and whole batches
            // of them).
            // (This rank's part of each batch when data-parallel.)
            let chunk = |c: usize| {
                train
                    .shard()
                    .range(train_len.min((c + 1) * train_batch) - c * train_batch)
                    .len()
            };
            skipped += (next_position..bi).map(chunk).sum::<usize>();
            skipped += chunk(bi).saturating_sub(batch.indices.len());
            next_position = bi + 1;
            epoch_done = bi + 1 == batches;
            let x = batch
                .images
                .to_device(device)?
                .to_dtype(model.input_dtype(cfg.amp))?;
            // Mixed batches train on their soft targets (smoothing already in them).
            let (y, loss_fn) = match &batch.targets {
                Some(t) => (t.to_device(device)?, &self.soft_loss),
                None => (batch.labels.to_device(device)?, &self.loss_fn),
            };
            // Each rank draws its own masks (one rank: the stream of the batch).
            model.set_noise_key(
                crate::data::sample_rng(
                    cfg.seed,
                    epoch as u64,
                    NOISE_STREAM + (bi * ranks + self.rank) as u64,
                )
                .random::<u64>(),
            );
            let n = batch.indices.len();
            // A data-parallel rank may have no image at this position (the epoch's last,
            // small batch); it still takes part in the step.
            // On a rayon worker: the kernels' parallel loops then run in place instead of
            // waking the pool and sleeping (candle_resnet::threads::on_worker).
            let (loss, v) = if n == 0 {
                (None, 0.0)
            } else {
                let (l, v) =
                    candle_resnet::threads::on_cpu_worker(device, || -> Result<(Tensor, f64)> {
                        let logits = model.logits(&x, true)?;
                        let loss = loss_fn.forward(&logits, &y)?;
                        let v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                        Ok((loss, v))
                    })?;
                (Some(l), v)
            };
            if !v.is_finite() {
                bail!(
                    "train: the loss became {v} at epoch {}, batch {bi}; stopping. The last checkpoint ({}) still holds the end of epoch {}. Lower the learning rate (`TrainConfig::lr`) or check the data.",
                    epoch + 1,
                    self.paths.last().display(),
                    epoch
                );
            }
            // A group's gradient is that of the mean loss over all its images, whatever the
            // sizes of its micro-batches and however many the epoch's last group has: each
            // micro-batch's mean loss is weighted by its image count, the sum divided by the
            // group's count at the step.
            if let Some(loss) = loss {
                let acc = &mut st.acc;
                candle_resnet::threads::on_cpu_worker(device, || {
                    let loss = match cfg.accum_steps {
                        1 => loss,
                        _ => (loss * n as f64)?,
                    };
                    // `candle_resnet::backward`: `loss.backward()` with the fused blocks'
                    // weight gradients filed without candle's zero-fill and add.
                    acc.add(&candle_resnet::backward(&loss)?)
                })?;
            }
            step_loss += if cfg.accum_steps == 1 && ranks == 1 {
                v
            } else {
                v * n as f64
            };
            group_images += n;
            group_positions += 1;
            images += n;
            let group_end = if ranks > 1 {
                group_positions == cfg.accum_steps
            } else {
                st.acc.micro_batches() == cfg.accum_steps
            };
            if group_end || bi + 1 == batches {
                lr = self.schedule.lr(st.step);
                group_positions = 0;
                let Some(mean) = self.optimizer_step(st, (step_loss, group_images), lr)? else {
                    // No rank had an image: no step anywhere (as one process skips it).
                    (step_loss, group_images) = (0.0, 0);
                    continue;
                };
                group_images = 0;
                st.summary.step_losses.push(mean);
                loss_sum += mean;
                loss_n += 1;
                step_loss = 0.0;
                let event = StepEvent {
                    epoch: epoch + 1,
                    step: st.step,
                    total_steps: self.schedule.total,
                    loss: mean,
                    lr,
                    elapsed_s: self.run_start.elapsed().as_secs_f64(),
                };
                if observer.step(&event).is_break() {
                    stop = true;
                }
                if ranks > 1 {
                    // Stop together: a signal or a time budget may reach one rank a step
                    // before another, and a rank that left would leave the others waiting.
                    let mut any = [stop as u8 as f64];
                    self.world.all_reduce_sum_f64(&mut any)?;
                    stop = any[0] > 0.0;
                }
                // A recovery checkpoint at this step boundary: every N steps, every T minutes,
                // or because the run is asked to stop.
                let due = cfg
                    .checkpoint_every_steps
                    .is_some_and(|n| st.step.is_multiple_of(n))
                    || (cfg.checkpoint_every_minutes > 0.0
                        && st.last_checkpoint.elapsed().as_secs_f64()
                            >= 60.0 * cfg.checkpoint_every_minutes)
                    || stop;
                if due && bi + 1 < batches && self.writer {
                    let partial = PartialEpoch {
                        batches: bi + 1,
                        loss_sum,
                        steps: loss_n,
                        images,
                        skipped,
                        seconds: seconds_before + t0.elapsed().as_secs_f64(),
                    };
                    self.save_recovery(st, epoch, partial, observer)?;
                }
            }
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            observer.batch(&BatchProgress {
                epoch: epoch + 1,
                batch: bi + 1,
                batches,
                mean_loss: loss_sum / loss_n.max(1) as f64,
                lr,
                images_per_s: images as f64 / secs,
                run_eta_s: self.run_eta(st),
            });
            if stop {
                break;
            }
        }
        Ok(Trained {
            t0,
            loss_sum,
            loss_n,
            images,
            lr,
            data_wait_s,
            skipped,
            seconds_before,
            stop,
            epoch_done,
            report: it.stop(),
        })
    }

    /// One optimizer step on the gradients accumulated in `st.acc` over a group of
    /// `group_images` images whose losses sum (or, one image-weighted micro-batch per step on
    /// one process, equal) `step_loss`: averaged over the group and the ranks, clipped, applied,
    /// the buffers synchronised and the EMA updated. The step's mean loss, or `None` when no
    /// rank had an image (no step is taken).
    fn optimizer_step(
        &self,
        st: &mut State,
        (step_loss, group_images): (f64, usize),
        lr: f64,
    ) -> Result<Option<f64>> {
        let (cfg, ranks) = (self.cfg, self.ranks);
        let mut grads = st.acc.take();
        if cfg.accum_steps != 1 {
            // The mean over this process's images of the group.
            let k = 1.0 / group_images.max(1) as f64;
            for g in grads.values_mut() {
                *g = (&*g * k)?;
            }
        }
        let mut step_loss = step_loss;
        let mut unsynced = Vec::new();
        if ranks > 1 {
            // The global step: gradients averaged over the ranks, weighted by images.
            let (total, mean_loss, no_grad) =
                reduce_gradients(self.world, &self.vars, &mut grads, group_images, step_loss)?;
            if total == 0 {
                return Ok(None);
            }
            step_loss = mean_loss;
            unsynced = no_grad;
        }
        if let Some(max) = cfg.clip_grad {
            clip_grad_norm(&mut grads, max)?;
        }
        let opt = &mut st.opt;
        candle_resnet::threads::on_cpu_worker(self.device, || opt.step_with(&grads, lr))?;
        if ranks > 1 {
            // Buffers (batch-norm running statistics) follow rank 0's, as DDP's.
            sync_from_rank0(self.world, &self.vars, &unsynced)?;
        }
        st.step += 1;
        if let Some(e) = st.ema.as_mut() {
            e.update(self.varmap, st.step)?;
        }
        Ok(Some(if cfg.accum_steps == 1 || ranks > 1 {
            step_loss
        } else {
            step_loss / group_images.max(1) as f64
        }))
    }

    /// The checkpoint metadata of the run as it stands after `epoch` epochs (and `partial`
    /// batches of the next).
    fn meta(&self, st: &State, epoch: usize, partial: Option<PartialEpoch>) -> CheckpointMeta {
        CheckpointMeta {
            epoch,
            step: st.step,
            best_epoch: st.summary.best_epoch,
            best: st.summary.best.clone(),
            history: st.summary.history.clone(),
            config: self.cfg.clone(),
            data: Some(self.data_signature.clone()),
            partial,
            best_is_ema: st.summary.best_is_ema,
        }
    }

    /// A mid-epoch recovery checkpoint (rank 0).
    fn save_recovery(
        &self,
        st: &mut State,
        epoch: usize,
        partial: PartialEpoch,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let meta = self.meta(st, epoch, Some(partial));
        Checkpoint::capture_with_ema(self.varmap, &st.opt, meta, st.ema.as_ref())?
            .save(&self.paths.last())?;
        self.paths.keep_last(st.step, self.cfg.keep_checkpoints)?;
        st.last_checkpoint = Instant::now();
        observer.checkpoint(&CheckpointEvent {
            kind: CheckpointKind::Recovery,
            path: &self.paths.last(),
            step: st.step,
        });
        Ok(())
    }

    /// Ends epoch `epoch` (0-based) after its training `t`: evaluates on validation when due
    /// (and the EMA on the same images), records the epoch, keeps it when it validates best
    /// (or is the last, without validation), and writes the checkpoints: the chosen model first,
    /// the run's state last, so that a kill between the two redoes the epoch on resume.
    pub fn finish_epoch(
        &self,
        st: &mut State,
        epoch: usize,
        t: Trained,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        let (cfg, varmap, paths) = (self.cfg, self.varmap, &self.paths);
        let (model, device, world) = (self.model, self.device, self.world);
        let ips = t.images as f64 / (t.seconds_before + t.t0.elapsed().as_secs_f64()).max(1e-9);
        let evaluate_now = (epoch + 1).is_multiple_of(cfg.eval_every) || epoch + 1 == cfg.epochs;
        let (res, val_skipped) = match self.validation {
            Some(v) if evaluate_now => {
                let (r, s) = evaluate_distributed(model, v, device, world)?;
                (Some(r), s)
            }
            _ => (None, 0),
        };
        // The EMA evaluated on the same images, its values swapped into the model for it.
        let res_ema = match (self.validation, &st.ema) {
            (Some(v), Some(e)) if evaluate_now => {
                let saved = e.swap_in(varmap)?;
                let r = evaluate_distributed(model, v, device, world);
                Ema::restore(varmap, &saved)?;
                Some(r?.0)
            }
            _ => None,
        };
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: t.loss_sum / t.loss_n.max(1) as f64,
            lr: t.lr,
            val_top1: res.as_ref().map(|r| r.top1),
            val_top5: res.as_ref().map(|r| r.top5),
            val_nll: res.as_ref().map(|r| r.nll),
            val_ece: res.as_ref().map(|r| r.ece),
            ema_val_top1: res_ema.as_ref().map(|r| r.top1),
            images_per_s: ips,
            data_wait_s: t.data_wait_s,
            loader_ms_per_image: 1e3 * t.report.busy_s / t.report.images.max(1) as f64,
            skipped_images: t.skipped + val_skipped,
            skipped_train: t.skipped,
            skipped_validation: val_skipped,
        };
        if self.writer {
            observer.epoch_end(&EpochEnd {
                metrics: &m,
                epochs: cfg.epochs,
                run_eta_s: self.run_eta(st),
                train_data: &t.report,
            });
            append_line(
                &paths.metrics(),
                &serde_json::to_string(&m).map_err(candle_core::Error::wrap)?,
            )?;
        }
        st.summary.history.push(m);
        // Chosen on validation only; without a validation split every epoch replaces the last
        // (its EMA when there is one). The EMA is the candidate when it validates better.
        let selected_on = st.summary.selected_on;
        let (candidate, candidate_is_ema) = match (res, res_ema) {
            (Some(r), Some(e)) if e.top1 > r.top1 => (Some(e), true),
            (r, _) => (r, st.ema.is_some() && selected_on == Selection::LastEpoch),
        };
        let improved = match (&candidate, selected_on) {
            (_, Selection::LastEpoch) => true,
            (Some(r), Selection::Validation) => {
                st.summary.best.as_ref().is_none_or(|b| r.top1 > b.top1)
            }
            (None, Selection::Validation) => false,
        };
        if improved {
            st.summary.best = candidate.clone();
            st.summary.best_epoch = epoch + 1;
            st.summary.best_is_ema = candidate_is_ema;
        }
        let meta = self.meta(st, epoch + 1, None);
        if self.ranks > 1 && !candle_ddp::consistent(world, checksum(varmap)?)? {
            bail!(
                "train: after epoch {} the ranks' weights differ (rank {} of {}); the \
                 data-parallel run is no longer one run",
                epoch + 1,
                self.rank,
                self.ranks
            );
        }
        let ck = Checkpoint::capture_with_ema(varmap, &st.opt, meta, st.ema.as_ref())?;
        if improved && self.writer {
            ck.save(&paths.best())?;
            self.export_chosen(st)?;
            observer.checkpoint(&CheckpointEvent {
                kind: CheckpointKind::Best,
                path: &paths.best(),
                step: st.step,
            });
        }
        if self.writer {
            ck.save(&paths.last())?;
            paths.keep_last(st.step, cfg.keep_checkpoints)?;
            observer.checkpoint(&CheckpointEvent {
                kind: CheckpointKind::Epoch,
                path: &paths.last(),
                step: st.step,
            });
        }
        st.last_checkpoint = Instant::now();
        Ok(())
    }

    /// `model.safetensors` (torchvision names) of the chosen model: the EMA's values when it
    /// was chosen, swapped in for the export and back out.
    fn export_chosen(&self, st: &State) -> Result<()> {
        let (varmap, step, path) = (self.varmap, st.step as i64, self.paths.model());
        match (&st.ema, st.summary.best_is_ema) {
            (Some(e), true) => {
                let saved = e.swap_in(varmap)?;
                let r = candle_resnet::export::export_safetensors(varmap, step, &path);
                Ema::restore(varmap, &saved)?;
                r
            }
            _ => candle_resnet::export::export_safetensors(varmap, step, &path),
        }
    }
}

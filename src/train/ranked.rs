//! The trainer's data-parallel hooks (issue 16): one `Run` per rank, the ranks talking through a
//! `dist::Collective` (MPI processes under `mpirun`, or threads of one process in tests).
//!
//! - Start: rank 0 builds the run as a single process does (fresh, or resumed from its folder) and
//!   sends the others its settings, its PEDCC and its whole state as checkpoint bytes, so that every
//!   rank starts from the same bits whatever it could read itself. Rank 0 alone touches the run
//!   folder (lock, settings, metrics, plots, checkpoints).
//! - Each step (`train_epoch_ranked`): rank r trains on its slice of the global batch of N × batch
//!   images (`dist::shard` over the epoch's seeded permutation), the ranks vote (`dist::vote`: the
//!   global batch, a non-finite value, a stop request), then the gradients are combined into the
//!   global batch's (`dist::grads`) and every rank takes the same update.
//! - The epoch's sums (loss, correct, δ's norms, images) are summed across ranks before the δ
//!   schedule uses them: M is the mean over every image of the epoch, as on one process.
//! - Checkpoints do not depend on N: a mid-epoch position is stored in batches of `batch_size` (the
//!   single-process unit), so a run saved with 2 ranks resumes with 1 or 3.
//! - Failure: a non-finite value on any rank, or a stop request on any rank, is seen by every rank
//!   at the same step (one message naming the rank; nothing written, so the last checkpoint stays);
//!   any other error on a rank calls `Collective::abort`, which stops the others.

use super::*;
use crate::dist::{self, grads, shard, vote, Collective, RankFailed};
use std::rc::Rc;

/// The ranks a run trains with, and test hooks.
#[derive(Clone)]
pub struct Ranks {
    pub comm: Rc<dyn Collective>,
    pub hooks: RankHooks,
    /// GPU ranks' NCCL communicator (set at the start of a run on GPUs): gradients are summed on
    /// the devices; without it they go through the host (`dist::grads`).
    #[cfg(feature = "nccl")]
    pub(super) nccl: Option<Rc<dist::nccl::DeviceGroup>>,
}

/// Ways to make one rank fail or stop at a known step (tests; not for users).
#[derive(Clone, Debug, Default)]
pub struct RankHooks {
    /// A NaN in this rank's first gradient after the backward pass of this global step (1-based).
    pub nan_gradient_at: Option<u64>,
    /// A stop request on this rank (as Ctrl-C) during this global step.
    pub stop_at: Option<u64>,
    /// An error on this rank (as a failed read) at the start of this global step.
    pub fail_at: Option<u64>,
    /// Receives the split index of every image this rank trains on, in order.
    pub trained_images: Option<Rc<std::cell::RefCell<Vec<usize>>>>,
}

impl Ranks {
    /// One process.
    pub fn single() -> Ranks {
        Ranks::new(Rc::new(dist::Single))
    }

    pub fn new(comm: Rc<dyn Collective>) -> Ranks {
        Ranks {
            comm,
            hooks: RankHooks::default(),
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    pub fn with_hooks(mut self, hooks: RankHooks) -> Ranks {
        self.hooks = hooks;
        self
    }

    /// Number of ranks (1 for one process).
    pub(super) fn size(&self) -> usize {
        self.comm.size()
    }

    /// More than one rank: the data-parallel step loop.
    pub(super) fn distributed(&self) -> bool {
        self.comm.size() > 1
    }

    pub(super) fn is_writer(&self) -> bool {
        self.comm.is_writer()
    }

    /// Whether to stop after an epoch that was saved (a signal during evaluation or saving): any
    /// rank's request stops them all. For several ranks this is also where the others learn that
    /// rank 0 saved the epoch (or failed to).
    pub(super) fn stop_after_epoch(&self) -> Result<bool> {
        if !self.distributed() {
            return Ok(signal::stop_requested());
        }
        vote::any(&*self.comm, signal::stop_requested()).map_err(|e| together(e, ""))
    }

    /// Every rank done: none leaves while another may still need it.
    pub(super) fn finish(&self) -> Result<()> {
        self.comm.barrier().map_err(|e| together(e, ""))
    }
}

/// An error every rank of a run knows about (an agreed stop, or another rank's failure): rank 0
/// reports it, the others end without repeating it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoppedTogether(pub String);

/// Whether `e` is known to every rank (rank 0 prints it; the others stay quiet and do not abort).
pub fn known_to_all_ranks(e: &anyhow::Error) -> bool {
    e.is::<StoppedTogether>() || e.is::<Interrupted>()
}

/// Another rank's failure, as this rank reports it.
fn together(e: RankFailed, advice: &str) -> anyhow::Error {
    let advice = match advice {
        "" => String::new(),
        a => format!(" {a}"),
    };
    StoppedTogether(format!("{e}; all {} ranks stopped.{advice}", e.size)).into()
}

/// Trains a fresh run with several ranks (one `Ranks` per rank, each in its own process or
/// thread). With one rank it is `train_with`.
pub fn train_ranked(cfg: TrainConfig, opts: FreshOptions, ranks: Ranks) -> Result<RunSummary> {
    start(ranks, move || Run::fresh(cfg, opts))
}

/// Continues the run in `dir` with several ranks; the number of ranks may differ from the one it
/// was saved with. With one rank it is `resume_with`.
pub fn resume_ranked(dir: &Path, opts: ResumeOptions, ranks: Ranks) -> Result<RunSummary> {
    let dir = dir.to_path_buf();
    start(ranks, move || Run::resumed(&dir, opts))
}

/// What rank 0 sends the others at the start, before its checkpoint bytes.
#[derive(serde::Serialize, serde::Deserialize)]
struct StartHeader {
    config: serde_json::Value,
    /// The PEDCC's shape and values (PEDCC-head losses).
    centroids: Option<(Vec<usize>, Vec<f32>)>,
    /// Where the checkpoint on disk is (for the advice after a failure).
    saved: Option<String>,
}

fn start(ranks: Ranks, build: impl FnOnce() -> Result<Run>) -> Result<RunSummary> {
    let comm = ranks.comm.clone();
    if !ranks.distributed() {
        let mut run = build()?;
        run.ranks = ranks;
        return run.go();
    }
    let run = if comm.is_writer() {
        let run = build().and_then(|r| {
            supported(&r.cfg)?;
            let msg = r.start_message()?;
            Ok((r, msg))
        });
        // An empty message tells the others that rank 0 could not start (it reports why).
        let mut msg = run.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
        comm.broadcast_bytes(&mut msg)
            .map_err(|e| together(e, ""))?;
        run?.0
    } else {
        let mut msg = Vec::new();
        comm.broadcast_bytes(&mut msg)
            .map_err(|e| together(e, ""))?;
        if msg.is_empty() {
            return Err(StoppedTogether("rank 0 could not start the run".into()).into());
        }
        match Run::follower(&msg) {
            Ok(r) => r,
            Err(e) => {
                comm.abort(&crate::cli::error_text(&e));
                return Err(e);
            }
        }
    };
    let mut run = run;
    run.schedule = crate::train::recipe::lr_schedule_for_ranks(&run.cfg, comm.size())?;
    run.ranks = ranks;
    #[cfg(feature = "nccl")]
    if let Err(e) = run.join_nccl() {
        comm.abort(&crate::cli::error_text(&e));
        return Err(e);
    }
    let result = run.go();
    if let Err(e) = &result {
        if !known_to_all_ranks(e) {
            comm.abort(&crate::cli::error_text(e));
        }
    }
    result
}

/// The data-parallel line of the run's header: ranks, global batch, the lr rule.
pub(super) fn ranks_line(cfg: &TrainConfig, ranks: usize) -> String {
    let rule = match cfg.lr_scaling {
        crate::train::config::LrScaling::None => format!("lr {} (not scaled)", cfg.lr),
        crate::train::config::LrScaling::Linear => format!(
            "lr scaled linearly: {} × {ranks} = {}",
            cfg.lr,
            cfg.lr * cfg.lr_scaling.factor(ranks)
        ),
    };
    format!(
        "data parallel: {ranks} ranks × batch {} = global batch {}, {rule}, batch norm {}",
        cfg.batch_size,
        ranks * cfg.batch_size,
        match cfg.sync_bn {
            true => "synchronised across ranks",
            false => "per rank",
        }
    )
}

/// What several ranks cannot train yet.
fn supported(cfg: &TrainConfig) -> Result<()> {
    if matches!(cfg.loss, LossKind::Center | LossKind::Cot) {
        bail!(
            "the {} loss keeps per-step state outside the weights (centres, a second optimiser) \
             that data-parallel training does not combine yet; train it with one process",
            cfg.loss
        );
    }
    Ok(())
}

impl Run {
    /// GPU ranks open their NCCL communicators (every rank, at the start): gradients are then
    /// summed on the devices. When rank 0 cannot use NCCL every rank combines through the host and
    /// rank 0 says why; `Err` is this rank's own NCCL failure (the caller stops every rank).
    #[cfg(feature = "nccl")]
    fn join_nccl(&mut self) -> Result<()> {
        if !matches!(self.device, Device::Cuda(_)) {
            return Ok(());
        }
        let comm = self.ranks.comm.clone();
        match dist::nccl::DeviceGroup::join(&*comm, self.device).map_err(|e| anyhow!(e))? {
            dist::nccl::Joined::Group(g) => self.ranks.nccl = Some(Rc::new(g)),
            dist::nccl::Joined::Unavailable(why) => {
                if comm.is_writer() {
                    eprintln!(
                        "warning: GPU ranks without NCCL ({why}): gradients are summed through \
                         the host"
                    );
                }
            }
        }
        Ok(())
    }

    /// Replaces this rank's gradients (of its mean loss over `mine` images) with the global
    /// batch's through the host, in f64 (`dist::grads`): CPU ranks, and GPU ranks without NCCL
    /// (GPU ranks with NCCL sum on the devices, in the step loop).
    fn combine_gradients(&mut self, mine: usize, advice: &str) -> Result<()> {
        grads::combine_gradients(&*self.ranks.comm, &mut self.ps, mine)
            .map_err(|e| together(e, advice))?;
        Ok(())
    }

    /// Rank 0's settings, PEDCC and state (as checkpoint bytes, the tally of a stopped epoch
    /// included), for the other ranks.
    fn start_message(&self) -> Result<Vec<u8>> {
        let centroids = self.objective.centroids().map(|c| {
            let c = c.to_device(Device::Cpu);
            (c.shape().to_vec(), c.to_vec_f32())
        });
        let header = StartHeader {
            config: self.cfg.to_json(),
            centroids,
            saved: self.saved.clone(),
        };
        let mut state = self.state.clone();
        if let Some(t) = &self.pending {
            state
                .extra
                .insert(tally::EXTRA_KEY.to_string(), t.to_value());
        }
        let ckpt =
            crate::train::checkpoint::serialize_checkpoint(&self.ps, &self.sgd.state(), &state)?;
        let header = serde_json::to_vec(&header)?;
        let mut msg = (header.len() as u64).to_le_bytes().to_vec();
        msg.extend_from_slice(&header);
        msg.extend_from_slice(&ckpt);
        Ok(msg)
    }

    /// A rank other than 0, from rank 0's start message: the same network, weights, optimiser
    /// state and schedule; it reads the dataset itself and writes nothing.
    fn follower(msg: &[u8]) -> Result<Run> {
        let corrupt = || anyhow!("the start message from rank 0 is damaged");
        let len = u64::from_le_bytes(msg.get(..8).ok_or_else(corrupt)?.try_into()?) as usize;
        let header = msg.get(8..8 + len).ok_or_else(corrupt)?;
        let header: StartHeader = serde_json::from_slice(header)?;
        let ckpt_bytes = &msg[8 + len..];
        let mut cfg = TrainConfig::from_json(&header.config)?;
        cfg.device = device_for_rank(&cfg.device);
        let (device, ds, train, test) = prepare(&cfg, false, false)?;
        if crate::train::graphed::wanted(&cfg, device)?.is_some() {
            bail!(
                "PODGPU_CUDA_GRAPH=1 replays the steps of one process only; unset it for a run \
                 with several ranks"
            );
        }
        let centroids = header
            .centroids
            .map(|(shape, values)| Tensor::from_vec(&shape, values));
        let mut ps = ParamStore::new();
        let net = build_network(&cfg, &ds, &train, centroids.as_ref(), &mut ps)?;
        let ckpt =
            crate::train::checkpoint::parse_checkpoint(Path::new("(rank 0's state)"), ckpt_bytes)?;
        ckpt.restore_into(&mut ps, &cfg.model)?;
        ps.to_device(device);
        let mut sgd = crate::train::recipe::optimizer(&cfg, &ps)?;
        sgd.load_state(ckpt.optim.clone(), &ps)?;
        let state = ckpt.state.clone();
        let pending = EpochTally::from_extra(&state.extra)?;
        let delta = DeltaSchedule::resume(cfg.variant, cfg.alpha, state.epoch, state.mean_norm);
        let dir = cfg.out.clone().unwrap_or_default();
        let objective = Objective::new(&cfg, centroids.map(|p| p.to_device(device)), &ps)?;
        let cadence = Cadence::from_env(cfg.detect_anomaly)?;
        Ok(Run {
            objective,
            schedule: crate::train::recipe::lr_schedule(&cfg)?,
            metrics: MetricsLog::unwritten(&dir),
            dir,
            cfg,
            device,
            train,
            test,
            net,
            ps,
            sgd,
            delta,
            state,
            pending,
            saved: header.saved,
            cadence,
            loop_counts: LoopCounts::default(),
            ranks: Ranks::single(),
            _lock: None,
        })
    }

    /// The error of a step where some rank's loss or gradient was not finite: every rank stops
    /// with it before the update, so the weights (and the checkpoint on disk) are the last good.
    fn non_finite_on(&self, ranks: &[usize], at: &str) -> anyhow::Error {
        StoppedTogether(format!(
            "a non-finite loss or gradient on {} of {} at {at}: training diverged; all ranks \
             stopped before the update. {} (--detect-anomaly finds the first op that produced \
             a non-finite value)",
            vote::name_ranks(ranks),
            self.ranks.comm.size(),
            self.recovery_advice()
        ))
        .into()
    }

    /// Sums the epoch's tally across ranks (rank 0 carries the sums of a resumed epoch, the
    /// others start from zero, so the result is the epoch's).
    fn reduce_tally(&self, tally: &mut EpochTally) -> Result<()> {
        let mut v = [
            tally.loss_sum,
            tally.norm_sum,
            tally.correct as f64,
            tally.seen as f64,
        ];
        self.ranks
            .comm
            .all_reduce_sum(&mut v)
            .map_err(|e| together(e, &self.recovery_advice()))?;
        tally.loss_sum = v[0];
        tally.norm_sum = v[1];
        tally.correct = v[2] as usize;
        tally.seen = v[3] as usize;
        Ok(())
    }

    /// `train_epoch` for several ranks.
    pub(super) fn train_epoch_ranked(
        &mut self,
        loader: &Loader,
        epoch: usize,
        resume: Option<EpochTally>,
    ) -> Result<EpochOutcome> {
        let cfg = self.cfg.clone();
        let comm = self.ranks.comm.clone();
        let (ranks, rank) = (comm.size(), comm.rank());
        let batch = cfg.batch_size;
        let n = loader.images_per_epoch();
        // The tally counts batches of `batch_size` images, as one process does, so that a
        // checkpoint does not depend on the number of ranks.
        let total_batches = loader.batches_per_epoch();
        let lr = self.schedule.lr(epoch, 0, total_batches);
        let mut tally = resume.unwrap_or_default();
        if !comm.is_writer() {
            tally = EpochTally {
                next_batch: tally.next_batch,
                ..EpochTally::default()
            };
        }
        if tally.next_batch == 0
            && cfg.variant == Variant::Reference
            && self.schedule.is_milestone(epoch)
        {
            self.sgd.reset_momentum();
        }
        let delta = self.delta.delta();
        let started = Instant::now();
        // The images already trained this epoch (a resumed one), then global batches of the rest.
        let first_batch = tally.next_batch;
        let done = (first_batch * batch).min(n);
        let rest = n - done;
        let steps = shard::global_batches(rest, ranks, batch);
        let steps_before = first_batch / ranks;
        let mode = match comm.is_writer() {
            true => crate::train::ProgressMode::Auto,
            false => crate::train::ProgressMode::Off,
        };
        let mut progress = Progress::with_mode(steps_before + steps, epoch + 1, cfg.epochs, mode);
        let mut ledger = StepLedger::new(self.device, &tally, &self.ps);
        let reads_before = crate::tensor::host_reads();
        let waits_before = host_waits(self.device);
        let order = loader.order(epoch as u64);
        let poison = nan_gradient_step(rank)?.or(self.ranks.hooks.nan_gradient_at);
        let killed_at = kill_step(rank)?;
        let advice = self.recovery_advice();
        self.cadence.restart();
        for k in 0..steps {
            let step = self.state.global_step + 1;
            let at = format!(
                "epoch {}, global batch {} of {} (step {step})",
                epoch + 1,
                steps_before + k + 1,
                steps_before + steps
            );
            if self.ranks.hooks.fail_at == Some(step) {
                bail!("a test failure at {at}");
            }
            if self.train.data_changed() {
                bail!(
                    "the dataset file changed while training (it was truncated or rewritten in \
                     place) at {at}; {advice}"
                );
            }
            let slice = shard::rank_slice(rest, ranks, batch, k, rank);
            let indices = &order[done + slice.start..done + slice.end];
            let step_lr = self.schedule.lr(epoch, tally.next_batch, total_batches);
            // Batch norm and SC need two images: a slice of one sits this step out (it still
            // votes and takes the update).
            let mut mine = if indices.len() >= 2 { indices.len() } else { 0 };
            // Synchronised batch norm sums statistics inside the forward and backward passes, so
            // every rank must run them: the ranks first learn the global batch (for each rank's
            // share of it), and all skip a tail where some rank has fewer than 2 images.
            let sync_bn = match cfg.sync_bn {
                true => {
                    let sizes = vote::vote(
                        &*comm,
                        vote::Ballot {
                            batch: indices.len(),
                            ..Default::default()
                        },
                    )
                    .map_err(|e| together(e, &advice))?;
                    if sizes.smallest < 2 {
                        mine = 0;
                        None
                    } else {
                        Some(dist::sync_bn::activate(
                            comm.clone(),
                            indices.len() as f64 / sizes.total as f64,
                        ))
                    }
                }
                false => None,
            };
            let mut stats = None;
            let mut non_finite = false;
            #[cfg(feature = "nccl")]
            let mut overlap: Option<dist::nccl::Overlap> = None;
            if mine > 0 {
                if let Some(seen) = &self.ranks.hooks.trained_images {
                    seen.borrow_mut().extend_from_slice(indices);
                }
                let b = loader.assemble(epoch as u64, tally.next_batch, indices);
                let (images, labels) = b.into_parts();
                let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
                let mut tape = Tape::train()
                    .with_anomaly_detection(cfg.detect_anomaly)
                    .with_rng(Rng::derive(cfg.seed ^ DROP_SALT ^ rank_salt(rank), step));
                let x = tape.constant(images.to_device(self.device));
                let out = self.net.forward(&mut tape, &mut self.ps, &x);
                let labels_t = loss::labels_tensor(&labels, out.features.value());
                let l = self
                    .objective
                    .loss(&mut tape, &self.ps, &out, &labels_t, delta);
                if let Some(a) = tape.anomaly() {
                    bail!("--detect-anomaly on rank {rank} at {at}: {a}. {advice}");
                }
                let loss_t = l.value().clone();
                // GPU ranks with NCCL start summing each bucket of gradients as soon as the
                // backward pass has finished it (`dist::nccl::Overlap`).
                #[cfg(feature = "nccl")]
                if let Some(g) = self.ranks.nccl.clone() {
                    let mut o = g.overlap(&self.ps, mine);
                    tape.backward_then(&l, &mut self.ps, &mut |ps, id| o.grad_ready(ps, id));
                    overlap = Some(o);
                } else {
                    tape.backward(&l, &mut self.ps);
                }
                #[cfg(not(feature = "nccl"))]
                tape.backward(&l, &mut self.ps);
                if let Some(a) = tape.anomaly() {
                    bail!("--detect-anomaly on rank {rank} at {at}: {a}. {advice}");
                }
                drop(tape);
                if let Some(e) = dist::sync_bn::take_failure() {
                    return Err(together(e, &advice));
                }
                drop(sync_bn);
                if poison == Some(step) {
                    poison_gradient(&mut self.ps, None)?;
                }
                if killed_at == Some(step) {
                    // SAFETY: raising a signal in this process; SIGKILL never returns.
                    unsafe { libc::raise(libc::SIGKILL) };
                }
                non_finite = !loss_t.to_vec_f64()[0].is_finite() || !gradients_finite(&self.ps);
                let norms =
                    loss::delta_norms(cfg.variant, out.features.value(), out.logits.value());
                stats = Some((loss_t, out.logits.value().clone(), labels_t, labels, norms));
            }
            let ballot = vote::Ballot {
                batch: mine,
                non_finite,
                stop: signal::stop_requested() || self.ranks.hooks.stop_at == Some(step),
            };
            let verdict = vote::vote(&*comm, ballot).map_err(|e| together(e, &advice))?;
            // GPU ranks with NCCL issue every bucket of the step whatever the verdict: NCCL needs
            // the same collectives on every rank, and the ranks with images started theirs during
            // the backward pass (a rank without images sends zeros for all of them).
            #[cfg(feature = "nccl")]
            let summed = match (overlap.take(), self.ranks.nccl.clone()) {
                (Some(o), _) => Some(o.finish(&mut self.ps, verdict.total)),
                (None, Some(g)) if verdict.total > 0 => {
                    Some(g.combine_gradients(&mut self.ps, mine, verdict.total))
                }
                _ => None,
            };
            if !verdict.non_finite.is_empty() {
                return Err(self.non_finite_on(&verdict.non_finite, &at));
            }
            tally.next_batch = (first_batch + (k + 1) * ranks).min(total_batches);
            if verdict.total > 0 {
                #[cfg(feature = "nccl")]
                match summed {
                    Some(r) => r.map_err(|e| anyhow!("{e}. {advice}"))?,
                    None => self.combine_gradients(mine, &advice)?,
                }
                #[cfg(not(feature = "nccl"))]
                self.combine_gradients(mine, &advice)?;
                if let Some(max_norm) = cfg.clip_grad {
                    crate::optim::clip_grad_norm(&mut self.ps, max_norm);
                }
                self.sgd.step_unless(&mut self.ps, step_lr, None);
                self.ps.zero_grad();
                self.state.global_step += 1;
                self.loop_counts.steps += 1;
                // Tests of signals under mpirun: wait here for one (the next vote carries it).
                hold_for_a_signal_in_tests(self.state.global_step);
            }
            if let Some((loss_t, logits, labels_t, labels, norms)) = stats {
                ledger.add_step(&loss_t, &logits, &labels_t, &labels, &norms, mine);
                tally.seen += mine;
            }
            progress.advance(steps_before + k, verdict.total);
            // The progress line shows rank 0's mean loss so far, read as often as one process
            // reads its ledger (the epoch's line has the mean over every rank).
            if comm.is_writer() && self.cadence.step_done() && tally.seen > 0 {
                self.loop_counts.ledger_reads += u64::from(ledger.has_news());
                let r = ledger.read();
                self.cadence.read_done();
                progress.show_loss(r.loss_sum / tally.seen as f64);
            }
            if !verdict.stop.is_empty() && tally.next_batch < total_batches {
                self.read_ledger_ranked(&mut ledger, &mut tally)?;
                tally.train_time_s += started.elapsed().as_secs_f64();
                self.count_loop(reads_before, waits_before);
                progress.finish(&format!(
                    "epoch {:>3}/{}  stopped after global batch {} of {} on request ({})",
                    epoch + 1,
                    cfg.epochs,
                    steps_before + k + 1,
                    steps_before + steps,
                    vote::name_ranks(&verdict.stop)
                ));
                return Ok(EpochOutcome::Stopped(tally));
            }
        }
        self.read_ledger_ranked(&mut ledger, &mut tally)?;
        self.count_loop(reads_before, waits_before);
        let EpochTally {
            loss_sum,
            seen,
            correct,
            norm_sum,
            train_time_s: earlier_time,
            ..
        } = tally;
        if seen == 0 {
            bail!(
                "epoch {} saw no training batch of at least 2 images",
                epoch + 1
            );
        }
        let mean_norm = norm_sum / seen as f64;
        self.delta.end_epoch(mean_norm)?;
        let train_time = earlier_time + started.elapsed().as_secs_f64();
        // Rank 0 alone scores the test split (the others wait at the epoch's end).
        let test_acc = match comm.is_writer() {
            true => self.score_test_if_due(&cfg, epoch)?,
            false => None,
        };
        let rec = EpochRecord {
            train_loss: loss_sum / seen as f64,
            train_acc: correct as f64 / seen as f64,
            test_acc,
            lr,
            delta: if cfg.loss.uses_delta() {
                delta
            } else {
                f64::NAN
            },
            mean_norm,
            images_per_s: seen as f64 / train_time,
            epoch_time_s: earlier_time + started.elapsed().as_secs_f64(),
            peak_mem_bytes: peak_memory(self.device),
            ..EpochRecord::new(epoch + 1)
        };
        progress.finish(&epoch_line(
            &cfg,
            &rec,
            delta,
            &format!("  ({ranks} ranks)"),
        ));
        Ok(EpochOutcome::Done(rec, test_acc))
    }

    /// This rank's sums from the ledger, then summed across ranks.
    fn read_ledger_ranked(
        &mut self,
        ledger: &mut StepLedger,
        tally: &mut EpochTally,
    ) -> Result<()> {
        if ledger.has_news() {
            self.loop_counts.ledger_reads += 1;
        }
        let r = ledger.read();
        tally.loss_sum = r.loss_sum;
        tally.norm_sum = r.norm_sum;
        tally.correct = r.correct as usize;
        self.reduce_tally(tally)
    }
}

/// Rank r's drop-path and dropout streams differ from the others' (its images do); rank 0's are a
/// single process's.
fn rank_salt(rank: usize) -> u64 {
    (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Whether every trainable gradient is finite (a host read of each).
fn gradients_finite(ps: &ParamStore) -> bool {
    ps.iter()
        .filter(|p| p.kind == crate::ParamKind::Trainable)
        .filter_map(|p| p.grad.as_ref())
        .all(|g| g.to_vec_f64().iter().all(|v| v.is_finite()))
}

/// `PODGPU_TEST_NAN_GRADIENT_AT=STEP@RANK`: a NaN gradient on rank RANK only (tests under mpirun).
fn nan_gradient_step(rank: usize) -> Result<Option<u64>> {
    let Ok(v) = std::env::var(TEST_NAN_GRADIENT_ENV) else {
        return Ok(None);
    };
    let Some((step, on)) = v.split_once('@') else {
        // Without `@RANK` the single-process hook's meaning: every rank.
        return Ok(test_nan_gradient_at()?.map(|(s, _)| s));
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match (parse(step), parse(on)) {
        (Some(s), Some(r)) => Ok((r == rank as u64).then_some(s)),
        _ => bail!("{TEST_NAN_GRADIENT_ENV}={v:?}: expected STEP[@RANK]"),
    }
}

/// A test hook: `PODGPU_TEST_KILL_AT=STEP@RANK` makes rank RANK kill itself with SIGKILL after
/// the backward pass of global step STEP (a rank dying without a word, under mpirun). Not for users.
pub const TEST_KILL_ENV: &str = "PODGPU_TEST_KILL_AT";

fn kill_step(rank: usize) -> Result<Option<u64>> {
    let Ok(v) = std::env::var(TEST_KILL_ENV) else {
        return Ok(None);
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    match v.split_once('@').map(|(s, r)| (parse(s), parse(r))) {
        Some((Some(s), Some(r))) => Ok((r == rank as u64).then_some(s)),
        _ => bail!("{TEST_KILL_ENV}={v:?}: expected STEP@RANK"),
    }
}

/// The device of a rank other than 0: `cuda:<local rank>` when the run's device is `cuda` or a
/// usable `auto`, so that the ranks of one machine use its GPUs in turn.
fn device_for_rank(device: &str) -> String {
    let Some(local) = dist::local_rank() else {
        return device.to_string();
    };
    match device {
        "cuda" => format!("cuda:{local}"),
        "auto" => match crate::device::select("auto") {
            Ok((Device::Cuda(_), _)) => format!("cuda:{local}"),
            _ => device.to_string(),
        },
        d => d.to_string(),
    }
}

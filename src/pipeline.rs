//! Wires the stages: source → decode/validate → Arrow buffer → learner → snapshots (and
//! offset commits) → metrics. Runs until the source ends, `run.max_events` records have been
//! consumed, or shutdown is requested (Ctrl-C): then it finishes the step in flight, writes a
//! final snapshot, commits and returns a summary.

use crate::buffer::EventBuffer;
use crate::config::{Config, SourceKind};
use crate::learner::{EvalReport, Learner, StepReport};
use crate::metrics::Metrics;
use crate::snapshot::writer::BackgroundWriter;
use crate::snapshot::{Evaluation, EventRecord, SnapshotContent, SnapshotInfo, StepRecord};
use crate::source::{
    decode_event, DeadLetterSink, FileDeadLetters, Offsets, Position, PreferenceEvent, Source,
    SourceItem,
};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub consumed: u64,
    pub valid: u64,
    pub dead_lettered: u64,
    pub held_out: u64,
    pub trained: u64,
    pub steps: u64,
    pub final_loss: f64,
    pub holdout: EvalReport,
    pub link_drift_sup: f64,
    pub link_drift_l2: f64,
    pub snapshots_written: u64,
    pub last_snapshot: Option<PathBuf>,
    pub resumed_from: Option<String>,
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "spoke run summary")?;
        if let Some(r) = &self.resumed_from {
            writeln!(f, "  resumed from       {r}")?;
        }
        writeln!(
            f,
            "  events             {} consumed: {} trained, {} held out, {} dead-lettered",
            self.consumed, self.trained, self.held_out, self.dead_lettered
        )?;
        writeln!(f, "  steps              {}", self.steps)?;
        writeln!(f, "  final loss         {:.4}", self.final_loss)?;
        writeln!(
            f,
            "  held-out accuracy  {:.3} (AUC {:.3}, {} pairs)",
            self.holdout.accuracy, self.holdout.auc, self.holdout.n
        )?;
        writeln!(
            f,
            "  link drift         sup {:.3}, L2 {:.3} (learned link vs best logistic)",
            self.link_drift_sup, self.link_drift_l2
        )?;
        writeln!(
            f,
            "  snapshots          {} written, last {}",
            self.snapshots_written,
            self.last_snapshot
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into())
        )?;
        write!(f, "  time               {:.1} s", self.seconds)
    }
}

/// Tracks, per stream-partition, what has been consumed and what is still untrained, so a
/// snapshot records offsets that cover exactly the events it accounts for.
#[derive(Default)]
struct OffsetTracker {
    /// Next offset after the highest consumed one.
    consumed_next: Offsets,
}

impl OffsetTracker {
    fn consumed(&mut self, p: &Position) {
        let next = p.offset + 1;
        if self
            .consumed_next
            .get(&p.stream, p.partition)
            .is_none_or(|n| n < next)
        {
            self.consumed_next.set(&p.stream, p.partition, next);
        }
    }
    /// Offsets covered given the untrained positions still buffered.
    fn covered<'a>(&self, pending: impl Iterator<Item = &'a Position>) -> Offsets {
        let mut out = self.consumed_next.clone();
        let mut mins: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for p in pending {
            let e = mins
                .entry((p.stream.clone(), p.partition))
                .or_insert(p.offset);
            *e = (*e).min(p.offset);
        }
        for ((s, q), o) in mins {
            if out.get(&s, q).is_none_or(|n| o < n) {
                out.set(&s, q, o);
            }
        }
        out
    }
    fn forget(&mut self, parts: &[(String, i32)]) {
        for (s, p) in parts {
            if let Some(m) = self.consumed_next.0.get_mut(s) {
                m.remove(p);
            }
        }
    }
}

/// Build the configured source.
pub fn build_source(cfg: &Config, metrics: Arc<Metrics>) -> Result<Box<dyn Source>> {
    Ok(match cfg.source.kind {
        SourceKind::Synthetic => Box::new(crate::source::synthetic::SyntheticSource::new(
            cfg.source.synthetic.clone(),
            None,
        )),
        SourceKind::File => Box::new(crate::source::file::FileSource::new(
            cfg.source
                .file
                .path
                .clone()
                .context("source.file.path: required")?,
        )),
        SourceKind::Kafka => crate::source::kafka::build_source(&cfg.kafka, metrics)?,
    })
}

/// Build the configured dead-letter sink.
pub fn build_dead_letters(cfg: &Config, metrics: Arc<Metrics>) -> Result<Box<dyn DeadLetterSink>> {
    if cfg.source.kind == SourceKind::Kafka && !cfg.kafka.dead_letter_topic.is_empty() {
        return crate::source::kafka::build_dead_letters(&cfg.kafka, metrics);
    }
    Ok(Box::new(FileDeadLetters::open(
        cfg.data_path(&cfg.dead_letter.path),
    )?))
}

/// Options of one run that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Ignore existing snapshots and start from the initial model.
    pub fresh: bool,
    /// Print progress lines to stderr.
    pub progress: bool,
}

struct Pending {
    metrics: Vec<StepRecord>,
    events: Vec<EventRecord>,
}

/// Run the pipeline with the given (already built) source and dead-letter sink.
pub async fn run_with(
    cfg: Config,
    mut source: Box<dyn Source>,
    mut dead: Box<dyn DeadLetterSink>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    opts: RunOptions,
) -> Result<Summary> {
    let started = Instant::now();
    let data_dir = cfg.run.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("run.data_dir: cannot create {}", data_dir.display()))?;
    let source_kind = source.kind();
    metrics
        .info
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            cfg.objective.kind.as_str(),
            source_kind,
        ])
        .set(1.0);

    let policy = crate::model::load_policy(&cfg.model, &data_dir)?;
    tracing::info!("Policy: {}.", policy.describe());
    let mut learner = Learner::new(policy, &cfg)?;

    // Resume from the latest good snapshot unless asked not to.
    let mut summary = Summary::default();
    let mut resume_offsets = Offsets::default();
    // Records consumed over the data directory's history (for `run.max_events`) and records
    // accounted for in durable snapshots (a snapshot's `events_seen`).
    let mut events_seen: u64 = 0;
    let mut accounted: u64 = 0;
    let mut parent: Option<String> = None;
    if !opts.fresh {
        if let Some(r) = crate::snapshot::resume::load_latest(&data_dir, &mut learner)? {
            tracing::info!(
                "Resumed from snapshot {} (step {}, {} events seen).",
                r.name,
                r.manifest.step,
                r.manifest.events_seen
            );
            resume_offsets = r.manifest.offsets.clone();
            events_seen = r.manifest.events_seen;
            accounted = r.manifest.events_seen;
            parent = Some(r.name.clone());
            summary.resumed_from = Some(r.name);
        }
    }
    source.start(&resume_offsets).await?;
    let mut writer = BackgroundWriter::with_promotion(
        &data_dir,
        cfg.snapshot.clone(),
        Some(cfg.promote.clone()),
    )?;
    if let Some(r) = &summary.resumed_from {
        writer.protect(r);
    }

    let max_events = cfg.run.max_events;
    let batch_size = cfg.run.batch_size;
    let capacity = cfg.run.buffer_capacity;
    let mut buffer = EventBuffer::new();
    let mut holdout: VecDeque<(PreferenceEvent, Position)> = VecDeque::new();
    // Seeded with the resumed offsets so every later snapshot still records partitions that
    // deliver nothing new in this process (else a crash before the next commit would resume
    // them from an older committed offset and train their events twice).
    let mut ledger = Ledger {
        tracker: OffsetTracker {
            consumed_next: resume_offsets.clone(),
        },
        pending: Pending {
            metrics: vec![],
            events: vec![],
        },
        accounted,
        parent,
    };
    let mut source_done = false;
    let mut paused = false;
    let mut last_report: Option<StepRecord> = None;
    let mut last_snapshot_step = learner.step_count();
    let mut eval = EvalReport::default();

    let consumed_limit_reached = |seen: u64| -> bool { max_events > 0 && seen >= max_events };

    loop {
        let done = writer.try_completed();
        completed(done, &mut writer, source.as_mut(), &mut summary, &metrics).await?;
        // 1. Train while a full batch is ready (or flush the remainder at the end).
        let finishing =
            source_done || consumed_limit_reached(events_seen) || shutdown.is_cancelled();
        while buffer.len() >= batch_size
            || (finishing && !shutdown.is_cancelled() && !buffer.is_empty())
        {
            let batch = buffer.take(batch_size)?;
            metrics.buffer_events.set(buffer.len() as i64);
            let (l, rep) = tokio::task::spawn_blocking(move || {
                let r = learner.step(&batch);
                (learner, r)
            })
            .await
            .context("learner task panicked")?;
            learner = l;
            let rep: StepReport = rep?;
            record_step(&metrics, &rep, &mut ledger.pending, &mut summary);
            last_report = Some(rep.record);
            if learner.step_count() >= last_snapshot_step + cfg.snapshot.every_steps {
                eval = evaluate(&learner, &mut holdout, &metrics).await?;
                dead.flush().await?;
                ledger.snapshot(
                    &cfg,
                    &learner,
                    &buffer,
                    Some((&eval, &holdout)),
                    &mut writer,
                )?;
                last_snapshot_step = learner.step_count();
                let done = writer.try_completed();
                completed(done, &mut writer, source.as_mut(), &mut summary, &metrics).await?;
                if opts.progress {
                    eprintln!(
                        "step {:>6}  events {:>8}  loss {:.4}  held-out acc {}  drift {:.3}  snapshot {}",
                        learner.step_count(),
                        events_seen,
                        last_report.as_ref().map(|r| r.loss).unwrap_or(f64::NAN),
                        if eval.n > 0 { format!("{:.3}", eval.accuracy) } else { "-".into() },
                        learner.link().drift().sup,
                        summary
                            .last_snapshot
                            .as_ref()
                            .and_then(|p| p.file_name())
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_else(|| "(writing)".into())
                    );
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        if finishing {
            break;
        }

        // 2. Backpressure with hysteresis: pause at capacity, resume at half.
        if !paused && buffer.len() >= capacity {
            source.set_paused(true).await?;
            paused = true;
        } else if paused && buffer.len() <= capacity / 2 {
            source.set_paused(false).await?;
            paused = false;
        }

        // 3. Read the next record.
        let item = tokio::select! {
            biased;
            _ = shutdown.cancelled() => continue,
            item = source.next() => item?,
        };
        match item {
            None => source_done = true,
            Some(SourceItem::Idle) => {}
            Some(SourceItem::Revoked { partitions, ack }) => {
                // Make what was trained durable and committed before letting go. The
                // snapshot is taken while the revoked partitions' untrained events are still
                // buffered, so its offsets do not cover them; the new owner re-reads them.
                dead.flush().await?;
                ledger.snapshot(&cfg, &learner, &buffer, None, &mut writer)?;
                let done = writer.wait_idle().await;
                completed(done, &mut writer, source.as_mut(), &mut summary, &metrics).await?;
                last_snapshot_step = learner.step_count();
                let dropped = buffer.drop_partitions(&partitions);
                events_seen -= dropped as u64;
                tracing::info!(
                    "Partitions revoked: {:?}; dropped {dropped} untrained buffered events (the new owner re-reads them).",
                    partitions
                );
                ledger.tracker.forget(&partitions);
                ledger.pending.events.retain(|e| {
                    !partitions
                        .iter()
                        .any(|(s, p)| *s == e.stream && *p == e.partition)
                });
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
            Some(SourceItem::Record(rec)) => {
                events_seen += 1;
                summary.consumed += 1;
                let topic: &str = if source_kind == "kafka" {
                    &rec.position.stream
                } else {
                    source_kind
                };
                metrics
                    .events_consumed
                    .with_label_values(&[source_kind, topic])
                    .inc();
                ledger.tracker.consumed(&rec.position);
                match decode_event(&rec.payload, &rec.position.fallback_id()) {
                    Ok(ev) => {
                        summary.valid += 1;
                        metrics
                            .events_valid
                            .with_label_values(&[source_kind, topic])
                            .inc();
                        if crate::util::is_holdout(&ev.event_id, cfg.run.holdout_fraction) {
                            summary.held_out += 1;
                            metrics.events_held_out.inc();
                            ledger.pending.events.push(EventRecord {
                                event_id: ev.event_id.clone(),
                                stream: rec.position.stream.clone(),
                                partition: rec.position.partition,
                                offset: rec.position.offset,
                                role: "holdout".into(),
                                step: None,
                                weight: ev.weight_or_one(),
                            });
                            holdout.push_back((ev, rec.position));
                            while holdout.len() > cfg.run.holdout_capacity {
                                holdout.pop_front();
                            }
                        } else {
                            buffer.push(ev, rec.position);
                            metrics.buffer_events.set(buffer.len() as i64);
                        }
                    }
                    Err(err) => {
                        summary.dead_lettered += 1;
                        metrics
                            .events_rejected
                            .with_label_values(&[source_kind, err.category()])
                            .inc();
                        dead.send(&rec, &err.0).await.with_context(|| {
                            format!("writing a dead letter for {}", rec.position.fallback_id())
                        })?;
                        metrics
                            .events_dead_lettered
                            .with_label_values(&[source_kind, topic])
                            .inc();
                        ledger.pending.events.push(EventRecord {
                            event_id: rec.position.fallback_id(),
                            stream: rec.position.stream.clone(),
                            partition: rec.position.partition,
                            offset: rec.position.offset,
                            role: "dead_letter".into(),
                            step: None,
                            weight: 0.0,
                        });
                    }
                }
            }
        }
    }

    // Final evaluation and snapshot.
    eval = if holdout.is_empty() {
        eval
    } else {
        evaluate(&learner, &mut holdout, &metrics).await?
    };
    let need_final = learner.step_count() > last_snapshot_step
        || !ledger.pending.events.is_empty()
        || (summary.snapshots_written == 0 && writer.outstanding() == 0);
    if need_final {
        dead.flush().await?;
        ledger.snapshot(
            &cfg,
            &learner,
            &buffer,
            (eval.n > 0).then_some((&eval, &holdout)),
            &mut writer,
        )?;
    }
    let done = writer.wait_idle().await;
    completed(done, &mut writer, source.as_mut(), &mut summary, &metrics).await?;
    dead.flush().await?;
    source.close().await?;
    let drift = learner.link().drift();
    summary.steps = learner.step_count();
    summary.final_loss = last_report.map(|r| r.loss).unwrap_or(f64::NAN);
    summary.holdout = eval;
    summary.link_drift_sup = drift.sup;
    summary.link_drift_l2 = drift.l2;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn record_step(metrics: &Metrics, rep: &StepReport, pending: &mut Pending, summary: &mut Summary) {
    let r = &rep.record;
    metrics.learner_step_seconds.observe(r.step_seconds);
    if r.applied {
        metrics.learner_steps.inc();
        metrics.events_trained.inc_by(rep.trained.len() as u64);
        metrics.learner_replayed.inc_by(r.replayed as u64);
        metrics.replay_buffer_pairs.set(rep.replay_pairs as i64);
        summary.trained += rep.trained.len() as u64;
    } else {
        metrics.learner_rejected_steps.inc();
        tracing::warn!(
            "Step rejected: non-finite loss or gradient (loss {}, grad norm {}); keeping the last good weights.",
            r.loss,
            r.grad_norm
        );
    }
    metrics.learner_loss.set(r.loss);
    metrics.learner_grad_norm.set(r.grad_norm);
    metrics.learner_index_std.set(r.index_std);
    metrics.link_drift_sup.set(r.link_drift_sup);
    metrics.link_drift_l2.set(r.link_drift_l2);
    for t in &rep.trained {
        pending.events.push(EventRecord {
            event_id: t.event_id.clone(),
            stream: t.position.stream.clone(),
            partition: t.position.partition,
            offset: t.position.offset,
            role: "train".into(),
            step: Some(r.step),
            weight: t.weight,
        });
    }
    pending.metrics.push(r.clone());
}

async fn evaluate(
    learner: &Learner,
    holdout: &mut VecDeque<(PreferenceEvent, Position)>,
    metrics: &Metrics,
) -> Result<EvalReport> {
    let rows = holdout.make_contiguous();
    let rep = learner.evaluate(rows)?;
    if rep.n > 0 {
        metrics.holdout_accuracy.set(rep.accuracy);
        metrics.holdout_auc.set(rep.auc);
    }
    let d = learner.link().drift();
    metrics.link_drift_sup.set(d.sup);
    metrics.link_drift_l2.set(d.l2);
    metrics.link_logistic_slope.set(d.a);
    metrics.link_mass.set(learner.link().mass());
    Ok(rep)
}

/// Commit the offsets of snapshots whose background write has completed (in order).
async fn completed(
    done: Vec<Result<SnapshotInfo>>,
    writer: &mut BackgroundWriter,
    source: &mut dyn Source,
    summary: &mut Summary,
    metrics: &Metrics,
) -> Result<()> {
    for secs in writer.take_write_seconds() {
        metrics.snapshot_write_seconds.observe(secs);
    }
    for r in done {
        let info = r.context("writing a snapshot")?;
        source.commit(&info.manifest.offsets).await?;
        metrics.snapshots_written.inc();
        metrics.snapshot_last_step.set(info.manifest.step as i64);
        if info.promoted.is_some() {
            metrics.promotions.inc();
        }
        summary.snapshots_written += 1;
        summary.last_snapshot = Some(info.path);
    }
    Ok(())
}

/// Snapshot bookkeeping: records not yet in a snapshot, the offset tracker, how many records
/// the snapshot chain accounts for, and the snapshot being resumed from.
struct Ledger {
    pending: Pending,
    tracker: OffsetTracker,
    accounted: u64,
    parent: Option<String>,
}

impl Ledger {
    /// Copy the learner's state out and hand it to the background writer; offsets are committed
    /// by [`completed`] once the write is durable.
    fn snapshot(
        &mut self,
        cfg: &Config,
        learner: &Learner,
        buffer: &EventBuffer,
        eval: Option<(&EvalReport, &VecDeque<(PreferenceEvent, Position)>)>,
        writer: &mut BackgroundWriter,
    ) -> Result<()> {
        let offsets = self.tracker.covered(buffer.positions());
        // Only account for records below the covered offsets; the rest are re-read on resume
        // and so belong to a later snapshot.
        let (now, later): (Vec<EventRecord>, Vec<EventRecord>) =
            std::mem::take(&mut self.pending.events)
                .into_iter()
                .partition(|e| {
                    offsets
                        .get(&e.stream, e.partition)
                        .is_none_or(|next| e.offset < next)
                });
        self.pending.events = later;
        self.accounted += now.len() as u64;
        let (weights, optimizer, optimizer_step) = learner.export()?;
        let content = SnapshotContent {
            step: learner.step_count(),
            events_seen: self.accounted,
            objective: learner.objective_name().to_string(),
            config_hash: cfg.hash(),
            parent: self.parent.clone(),
            weights,
            optimizer,
            optimizer_step,
            learner_state: serde_json::to_value(learner.state())?,
            offsets,
            metrics: std::mem::take(&mut self.pending.metrics),
            events: now,
            link_curve: learner.link().curve(),
            replay: learner.replay_batch()?,
            eval: eval.map(|(e, holdout)| {
                let prompts = holdout.iter().map(|(ev, _)| ev.prompt.as_str());
                let seed = cfg.run.seed ^ learner.step_count();
                let kl = crate::promote::estimate_kl(learner.policy(), prompts, &cfg.promote, seed);
                Evaluation::from_report(e, kl)
            }),
        };
        writer.submit(content)
    }
}

/// Run with the configured source and sink, serving metrics while it runs.
pub async fn run(cfg: Config, shutdown: CancellationToken, opts: RunOptions) -> Result<Summary> {
    let metrics = Metrics::new();
    let server = if cfg.metrics.addr.is_empty() {
        None
    } else {
        let (addr, h) = crate::metrics::serve(metrics.clone(), &cfg.metrics.addr).await?;
        tracing::info!("Serving metrics on http://{addr}/metrics.");
        Some(h)
    };
    let source = build_source(&cfg, metrics.clone())?;
    let dead = build_dead_letters(&cfg, metrics.clone())?;
    let r = run_with(cfg, source, dead, metrics, shutdown, opts).await;
    if let Some(h) = server {
        h.abort();
    }
    r
}

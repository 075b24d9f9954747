//! Prometheus metrics (one registry per pipeline) and the `/metrics` HTTP endpoint.
//!
//! Names follow Prometheus conventions (`spoke_` prefix, `_total` counters, base units).
//! Labels are bounded: source kind, topic, partition, reason category, objective. No label
//! ever carries a user, prompt or event id.

use anyhow::Result;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;

/// Every metric spoke exports.
pub struct Metrics {
    pub registry: Registry,
    pub events_consumed: IntCounterVec,
    pub events_valid: IntCounterVec,
    pub events_rejected: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub events_trained: IntCounter,
    pub events_held_out: IntCounter,
    pub buffer_events: IntGauge,
    pub learner_steps: IntCounter,
    pub learner_rejected_steps: IntCounter,
    pub learner_replayed: IntCounter,
    pub replay_buffer_pairs: IntGauge,
    pub learner_loss: Gauge,
    pub learner_step_seconds: Histogram,
    pub learner_grad_norm: Gauge,
    pub learner_index_std: Gauge,
    pub holdout_accuracy: Gauge,
    pub holdout_auc: Gauge,
    pub link_drift_sup: Gauge,
    pub link_drift_l2: Gauge,
    pub link_logistic_slope: Gauge,
    pub link_mass: Gauge,
    pub snapshots_written: IntCounter,
    pub snapshot_write_seconds: Histogram,
    pub snapshot_last_step: IntGauge,
    pub promotions: IntCounter,
    pub kafka_lag: IntGaugeVec,
    pub kafka_committed_offset: IntGaugeVec,
    pub kafka_paused: IntGauge,
    pub kafka_rebalances: IntCounterVec,
    pub source_errors: IntCounterVec,
    pub stage_seconds: HistogramVec,
    pub info: GaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric registers once");
    c
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let r = Registry::new();
        let cv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let c = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid"));
        let g = |name: &str, help: &str| reg(&r, Gauge::new(name, help).expect("valid"));
        let ig = |name: &str, help: &str| reg(&r, IntGauge::new(name, help).expect("valid"));
        let igv = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        let h = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("valid"),
            )
        };
        let secs = prometheus::exponential_buckets(0.001, 2.0, 16).expect("buckets");
        Arc::new(Self {
            events_consumed: cv(
                "spoke_events_consumed_total",
                "Records read from the source, valid or not.",
                &["source", "topic"],
            ),
            events_valid: cv(
                "spoke_events_decoded_total",
                "Records that decoded and validated as preference events.",
                &["source", "topic"],
            ),
            events_rejected: cv(
                "spoke_events_rejected_total",
                "Records that failed validation, by reason category.",
                &["source", "reason"],
            ),
            events_dead_lettered: cv(
                "spoke_events_dead_lettered_total",
                "Rejected records written to the dead-letter sink.",
                &["source", "topic"],
            ),
            events_trained: c(
                "spoke_events_trained_total",
                "Events the learner trained on.",
            ),
            events_held_out: c(
                "spoke_events_held_out_total",
                "Events routed to the held-out evaluation slice.",
            ),
            buffer_events: ig(
                "spoke_buffer_events",
                "Validated events waiting in the Arrow buffer.",
            ),
            learner_steps: c("spoke_learner_steps_total", "Optimiser steps taken."),
            learner_rejected_steps: c(
                "spoke_learner_rejected_steps_total",
                "Steps rejected because a gradient or weight was not finite.",
            ),
            learner_replayed: c(
                "spoke_learner_replayed_pairs_total",
                "Pairs drawn from the replay buffer and trained on again beside fresh ones.",
            ),
            replay_buffer_pairs: ig(
                "spoke_replay_buffer_pairs",
                "Recent trained pairs held in the learner's replay buffer.",
            ),
            learner_loss: g("spoke_learner_loss", "Loss of the last minibatch."),
            learner_step_seconds: h(
                "spoke_learner_step_seconds",
                "Wall time of one learner step.",
                secs.clone(),
            ),
            learner_grad_norm: g(
                "spoke_learner_grad_norm",
                "Global gradient norm of the last step (before clipping).",
            ),
            learner_index_std: g(
                "spoke_learner_index_std",
                "Standard deviation of the index t in the last minibatch.",
            ),
            holdout_accuracy: g(
                "spoke_holdout_pairwise_accuracy",
                "Pairwise accuracy of the index against labels on held-out events.",
            ),
            holdout_auc: g(
                "spoke_holdout_auc",
                "AUC of the index against labels on held-out events.",
            ),
            link_drift_sup: g(
                "spoke_link_drift_sup",
                "Sup-norm distance of the learned link from its best-fitting logistic.",
            ),
            link_drift_l2: g(
                "spoke_link_drift_l2",
                "Weighted L2 distance of the learned link from its best-fitting logistic.",
            ),
            link_logistic_slope: g(
                "spoke_link_logistic_slope",
                "Slope a of the best-fitting logistic sigma(a t + b).",
            ),
            link_mass: g(
                "spoke_link_effective_events",
                "Discounted number of (t, z) observations in the link estimate.",
            ),
            snapshots_written: c("spoke_snapshots_written_total", "Snapshots made durable."),
            snapshot_write_seconds: h(
                "spoke_snapshot_write_seconds",
                "Time to write and fsync one snapshot.",
                secs.clone(),
            ),
            snapshot_last_step: ig(
                "spoke_snapshot_last_step",
                "Learner step of the latest durable snapshot.",
            ),
            promotions: c("spoke_promotions_total", "Snapshots promoted."),
            kafka_lag: igv(
                "spoke_kafka_consumer_lag",
                "Messages between the consumer position and the high watermark.",
                &["topic", "partition"],
            ),
            kafka_committed_offset: igv(
                "spoke_kafka_committed_offset",
                "Last offset committed to Kafka (after a durable snapshot).",
                &["topic", "partition"],
            ),
            kafka_paused: ig(
                "spoke_kafka_paused",
                "1 while the consumer is paused for backpressure.",
            ),
            kafka_rebalances: cv(
                "spoke_kafka_rebalances_total",
                "Consumer-group rebalances, by kind.",
                &["kind"],
            ),
            source_errors: cv(
                "spoke_source_errors_total",
                "Errors talking to the source (retried).",
                &["source"],
            ),
            stage_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "spoke_stage_seconds",
                        "Wall time of pipeline stages within a step.",
                    )
                    .buckets(secs),
                    &["stage"],
                )
                .expect("valid"),
            ),
            info: reg(
                &r,
                GaugeVec::new(
                    Opts::new("spoke_info", "Build and run information (value 1)."),
                    &["version", "objective", "source"],
                )
                .expect("valid"),
            ),
            registry: r,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 exposition")
    }
}

/// Serve `/metrics` on `addr` until the returned handle is dropped or aborted. Returns the
/// bound address (so `127.0.0.1:0` picks a free port).
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: &str,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::{http::header, routing::get, Router};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.addr: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((bound, handle))
}

//! spoke: online preference alignment of language models from live human-feedback streams,
//! robust to an unknown link function (Semiparametric Preference Optimization).
//!
//! The data's path is the module order: [`source`] (Kafka, synthetic, file) decodes and
//! validates events → [`buffer`] appends them to Arrow record batches → [`learner`] scores
//! them with a [`model`] policy, computes the [`objective`] with the [`link`] estimate and
//! steps the optimiser ([`optim`]) → [`snapshot`] writes durable snapshots and [`promote`]
//! promotes good ones → [`metrics`] exports Prometheus metrics. [`pipeline`] wires the stages.

pub mod bench;
pub mod buffer;
pub mod config;
pub mod learner;
pub mod link;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod optim;
pub mod pipeline;
pub mod promote;
pub mod score;
pub mod snapshot;
pub mod source;
pub mod util;

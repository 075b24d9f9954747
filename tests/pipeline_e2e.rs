//! End to end on the embedded default: the pipeline runs in-process on a short synthetic
//! stream (with some malformed events), `/metrics` is scraped over HTTP while it runs, and the
//! snapshots are read back: safetensors into candle, Parquet with the parquet crate, and every
//! manifest checksum recomputed.

use parquet::file::reader::{FileReader, SerializedFileReader};
use spoke::config::Config;
use spoke::metrics::Metrics;
use spoke::pipeline::{build_dead_letters, build_source, run_with, RunOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Value of an unlabelled (or first matching) sample in a text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn parquet_rows(path: &Path) -> (usize, Vec<String>) {
    let f = std::fs::File::open(path).unwrap();
    let r = SerializedFileReader::new(f).unwrap();
    let md = r.metadata();
    let cols = md
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    (md.file_metadata().num_rows() as usize, cols)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = Config::load(
        None,
        &[
            format!("run.data_dir={:?}", data.display().to_string()),
            "run.max_events=800".into(),
            "snapshot.every_steps=10".into(),
            "source.synthetic.malformed_share=0.05".into(),
            "snapshot.keep_last=1000".into(),
        ],
    )
    .unwrap();
    let metrics = Metrics::new();
    let (addr, server) = spoke::metrics::serve(metrics.clone(), "127.0.0.1:0")
        .await
        .unwrap();

    // Scrape while the pipeline runs.
    let done = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(Mutex::new(Vec::<String>::new()));
    let scraper = {
        let (done, scrapes) = (done.clone(), scrapes.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Ok(body) = http_get(addr, "/metrics") {
                    scrapes.lock().unwrap().push(body);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
    };

    let source = build_source(&cfg, metrics.clone()).unwrap();
    let dead = build_dead_letters(&cfg, metrics.clone()).unwrap();
    let summary = run_with(
        cfg.clone(),
        source,
        dead,
        metrics.clone(),
        tokio_util::sync::CancellationToken::new(),
        RunOptions::default(),
    )
    .await
    .unwrap();
    done.store(true, Ordering::SeqCst);
    scraper.join().unwrap();
    let final_scrape = http_get(addr, "/metrics").unwrap();
    server.abort();

    // Accounting.
    assert_eq!(summary.consumed, 800);
    assert_eq!(
        summary.trained + summary.held_out + summary.dead_lettered,
        summary.consumed
    );
    assert!(summary.dead_lettered > 10, "{summary:?}");
    assert!(summary.steps >= 20, "{summary:?}");

    // Metrics: scraped over HTTP during the run, with the right content type and names.
    let scrapes = scrapes.lock().unwrap();
    assert!(
        scrapes.len() >= 2,
        "only {} scrapes during the run",
        scrapes.len()
    );
    assert!(
        scrapes[0].starts_with("HTTP/1.1 200"),
        "{}",
        &scrapes[0][..80]
    );
    assert!(final_scrape.contains("text/plain; version=0.0.4"));
    let mid: Vec<f64> = scrapes
        .iter()
        .filter_map(|s| sample(s, "spoke_events_consumed_total"))
        .collect();
    assert!(
        mid.iter().any(|v| *v > 0.0 && *v < 800.0),
        "no scrape saw the run in progress: {mid:?}"
    );
    assert_eq!(
        sample(&final_scrape, "spoke_events_consumed_total"),
        Some(800.0)
    );
    assert_eq!(
        sample(&final_scrape, "spoke_learner_steps_total"),
        Some(summary.steps as f64)
    );
    assert_eq!(
        sample(&final_scrape, "spoke_replay_buffer_pairs"),
        Some(summary.trained.min(1024) as f64)
    );
    assert!(sample(&final_scrape, "spoke_learner_replayed_pairs_total").unwrap() > 0.0);
    assert!(final_scrape.contains("spoke_events_rejected_total{reason="));
    assert!(final_scrape.contains("spoke_learner_step_seconds_bucket"));
    assert!(sample(&final_scrape, "spoke_learner_loss")
        .unwrap()
        .is_finite());
    for line in final_scrape.lines().filter(|l| l.starts_with("spoke_")) {
        assert!(
            !line.contains("event_id") && !line.contains("syn-"),
            "{line}"
        );
    }

    // Snapshots: at least two, each verifies; safetensors load into candle; Parquet reads.
    let snaps = spoke::snapshot::list(&data).unwrap();
    assert!(snaps.len() >= 2, "{snaps:?}");
    let mut event_rows = 0;
    let mut metric_rows = 0;
    for s in &snaps {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.join("manifest.json")).unwrap()).unwrap();
        let files = m["files"].as_object().unwrap();
        assert!(files.contains_key("metrics.parquet") && files.contains_key("events.parquet"));
        for (f, sum) in files {
            use sha2::Digest;
            let bytes = std::fs::read(s.join(f)).unwrap();
            assert_eq!(
                hex::encode(sha2::Sha256::digest(&bytes)),
                sum.as_str().unwrap(),
                "{f}"
            );
        }
        assert!(m["step"].as_u64().is_some() && m["config_hash"].as_str().unwrap().len() == 64);
        let weights = s.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        assert!(!tensors.is_empty());
        for (name, t) in &tensors {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name} not finite");
        }
        let (n, cols) = parquet_rows(&s.join("metrics.parquet"));
        assert!(cols.contains(&"loss".to_string()) && cols.contains(&"step".to_string()));
        metric_rows += n;
        let (n, cols) = parquet_rows(&s.join("events.parquet"));
        assert!(cols.contains(&"event_id".to_string()) && cols.contains(&"role".to_string()));
        event_rows += n;
    }
    assert_eq!(metric_rows as u64, summary.steps);
    assert_eq!(event_rows as u64, summary.consumed);

    // Replay: every step after the first also trained on as many recent pairs as fresh ones
    // (replay.ratio = 1), and the last snapshot holds the buffer with reference log-probs.
    use arrow::array::{Array, Int32Array};
    use spoke::snapshot::parquet_io::read_parquet;
    let mut steps: Vec<(i64, i32, i32)> = vec![];
    for s in &snaps {
        let b = read_parquet(&s.join("metrics.parquet")).unwrap();
        let col = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_any()
                .downcast_ref::<Int32Array>()
                .unwrap()
                .clone()
        };
        let st = arrow::compute::cast(
            b.column_by_name("step").unwrap(),
            &arrow::datatypes::DataType::Int64,
        )
        .unwrap();
        let st = st
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let (pairs, replayed) = (col("pairs"), col("replayed"));
        for i in 0..b.num_rows() {
            steps.push((st.value(i), pairs.value(i), replayed.value(i)));
        }
    }
    steps.sort();
    assert_eq!(steps[0].2, 0, "nothing to replay at the first step");
    assert!(
        steps[1..].iter().all(|(_, p, r)| p == r),
        "replayed != fresh pairs: {steps:?}"
    );
    let last = snaps.last().unwrap();
    let replay = read_parquet(&last.join("replay.parquet")).unwrap();
    assert_eq!(replay.num_rows() as u64, summary.trained.min(1024));
    for c in ["ref_logp_0", "ref_logp_1"] {
        assert_eq!(replay.column_by_name(c).unwrap().null_count(), 0, "{c}");
    }

    // Dead letters: one line per rejected record, with its reason and the original bytes.
    let dl = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = dl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, summary.dead_lettered);
    assert!(lines
        .iter()
        .all(|l| !l["reason"].as_str().unwrap().is_empty() && l["payload_hex"].is_string()));
}

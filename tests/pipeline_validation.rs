//! Event validation through the running pipeline: every kind of bad input lands in the
//! dead-letter sink with its reason, and the pipeline keeps training on the good ones.

use spoke::config::Config;
use spoke::source::synthetic::{synthetic_event, SyntheticConfig};
use std::io::Write;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_dead_lettered_and_the_pipeline_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let syn = SyntheticConfig::default();
    let bad: Vec<(&[u8], &str)> = vec![
        (br#"{"event_id":"m1","prompt":"p","response_1":"y","label":0}"#, "missing field `response_0`"),
        (br#"{"event_id":"m2","response_0":"x","response_1":"y","label":0}"#, "missing field `prompt`"),
        (br#"{"event_id":"t1","prompt":["p"],"response_0":"x","response_1":"y","label":0}"#, "wrong type for `prompt`"),
        (br#"{"event_id":"t2","prompt":"p","response_0":"x","response_1":"y","label":"1"}"#, "wrong type for `label`"),
        (br#"{"event_id":"l1","prompt":"p","response_0":"x","response_1":"y","label":2}"#, "must be 0 or 1"),
        (br#"{"event_id":"l2","prompt":"p","response_0":"x","response_1":"y","label":0.5}"#, "must be 0 or 1"),
        (br#"{"event_id":"w1","prompt":"p","response_0":"x","response_1":"y","label":1,"weight":"Infinity"}"#, "`weight`"),
        (br#"{"event_id":"w2","prompt":"p","response_0":"x","response_1":"y","label":1,"weight":1e999}"#, "invalid JSON"),
        (br#"{"event_id":"w3","prompt":"p","response_0":"x","response_1":"y","label":1,"weight":0}"#, "`weight`: must be > 0"),
        (br#"{"event_id":"e1","prompt":"","response_0":"x","response_1":"y","label":1}"#, "empty field `prompt`"),
        (br#"{"event_id":"e2","prompt":"p","response_0":"x","response_1":"   ","label":1}"#, "empty field `response_1`"),
        (b"{\"event_id\":\"u1\",\"prompt\":\"caf\xc3\",\"response_0\":\"x\",\"response_1\":\"y\",\"label\":1}", "UTF-8"),
        (b"not json at all", "invalid JSON"),
    ];
    let mut f = std::fs::File::create(&input).unwrap();
    let mut good = 0;
    for i in 0..200u64 {
        writeln!(f, "{}", synthetic_event(&syn, i).event.to_json()).unwrap();
        good += 1;
        if let Some((b, _)) = bad.get(i as usize / 10) {
            if i % 10 == 5 {
                f.write_all(b).unwrap();
                f.write_all(b"\n").unwrap();
            }
        }
    }
    // The TRL form is valid too.
    writeln!(
        f,
        r#"{{"prompt":"tell me about tea","chosen":"clear helpful","rejected":"rude"}}"#
    )
    .unwrap();
    good += 1;
    drop(f);

    let data = dir.path().join("data");
    let cfg = Config::load(
        None,
        &[
            format!("run.data_dir={:?}", data.display().to_string()),
            "source.kind=file".into(),
            format!("source.file.path={:?}", input.display().to_string()),
            "run.max_events=0".into(),
            "metrics.addr=\"\"".into(),
        ],
    )
    .unwrap();
    let summary = spoke::pipeline::run(
        cfg,
        tokio_util::sync::CancellationToken::new(),
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(summary.dead_lettered, bad.len() as u64, "{summary:?}");
    assert_eq!(summary.valid, good);
    assert_eq!(summary.trained + summary.held_out, good);
    assert!(summary.steps > 0);

    let dl = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = dl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), bad.len());
    for ((raw, want), line) in bad.iter().zip(&lines) {
        let reason = line["reason"].as_str().unwrap();
        assert!(reason.contains(want), "reason {reason:?} lacks {want:?}");
        // The original bytes are kept exactly, even when they are not UTF-8.
        assert_eq!(
            hex::decode(line["payload_hex"].as_str().unwrap()).unwrap(),
            *raw
        );
    }
}

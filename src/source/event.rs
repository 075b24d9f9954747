//! The preference-event contract (`schemas/preference_event.schema.json`) and its decoder.
//!
//! Decoding never panics: any input bytes give either a valid [`PreferenceEvent`] or a
//! [`DecodeError`] whose message names the field and the problem, which is what the
//! dead-letter sink records.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One validated preference event. `label == 1` means `response_1` was preferred.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceEvent {
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<String>,
    pub prompt: String,
    pub response_0: String,
    pub response_1: String,
    pub label: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotator: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_logp_0: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_logp_1: Option<f64>,
}

/// Why an event was rejected. The string is stable enough to grep and is what the
/// dead-letter sink stores as the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

impl DecodeError {
    fn new(s: impl Into<String>) -> Self {
        DecodeError(s.into())
    }
    /// A short, bounded category for metric labels (never carries user data).
    pub fn category(&self) -> &'static str {
        let s = self.0.as_str();
        if s.starts_with("invalid UTF-8") {
            "invalid_utf8"
        } else if s.starts_with("invalid JSON") || s.starts_with("not a JSON object") {
            "invalid_json"
        } else if s.starts_with("missing field") {
            "missing_field"
        } else if s.contains("wrong type") {
            "wrong_type"
        } else if s.starts_with("empty") {
            "empty_field"
        } else if s.starts_with("confluent") {
            "framing"
        } else {
            "invalid_value"
        }
    }
}

/// Strip the Confluent Schema Registry wire-format header (magic byte 0 + 4-byte schema id)
/// if present. JSON never starts with a 0 byte, so the check is unambiguous.
pub fn strip_confluent_header(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    match bytes.first() {
        Some(0) => {
            if bytes.len() < 5 {
                Err(DecodeError::new(
                    "confluent wire format: header shorter than 5 bytes",
                ))
            } else {
                Ok(&bytes[5..])
            }
        }
        Some(1) => Err(DecodeError::new(
            "confluent wire format: unsupported magic byte 1 (schema id in headers is not supported)",
        )),
        _ => Ok(bytes),
    }
}

/// Decode and validate one event from raw bytes (JSON, optionally Confluent-framed).
/// `fallback_id` is used when the event has no `event_id` (e.g. the TRL form): callers pass
/// something derived from the source position, so ids stay unique and deterministic.
pub fn decode_event(bytes: &[u8], fallback_id: &str) -> Result<PreferenceEvent, DecodeError> {
    let payload = strip_confluent_header(bytes)?;
    let text = std::str::from_utf8(payload)
        .map_err(|e| DecodeError::new(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| DecodeError::new(format!("invalid JSON: {e}")))?;
    let obj = match value {
        Value::Object(m) => m,
        other => {
            return Err(DecodeError::new(format!(
                "not a JSON object (got {})",
                type_name(&other)
            )))
        }
    };
    from_object(&obj, fallback_id)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn req_str(obj: &Map<String, Value>, key: &str) -> Result<String, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(DecodeError::new(format!("missing field `{key}`"))),
        Some(Value::String(s)) => {
            if s.trim().is_empty() {
                Err(DecodeError::new(format!("empty field `{key}`")))
            } else {
                Ok(s.clone())
            }
        }
        Some(other) => Err(DecodeError::new(format!(
            "wrong type for `{key}`: expected string, got {}",
            type_name(other)
        ))),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if key == "policy_version" => Ok(Some(n.to_string())),
        Some(other) => Err(DecodeError::new(format!(
            "wrong type for `{key}`: expected string, got {}",
            type_name(other)
        ))),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, DecodeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().ok_or_else(|| {
                DecodeError::new(format!("invalid value for `{key}`: not representable"))
            })?;
            if !x.is_finite() {
                return Err(DecodeError::new(format!(
                    "invalid value for `{key}`: must be finite"
                )));
            }
            Ok(Some(x))
        }
        // JSON has no NaN/Infinity literals; producers that stringify them are told why.
        Some(Value::String(s)) => Err(DecodeError::new(format!(
            "wrong type for `{key}`: expected number, got string {:?}",
            truncate(s, 32)
        ))),
        Some(other) => Err(DecodeError::new(format!(
            "wrong type for `{key}`: expected number, got {}",
            type_name(other)
        ))),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn from_object(
    obj: &Map<String, Value>,
    fallback_id: &str,
) -> Result<PreferenceEvent, DecodeError> {
    let trl = obj.contains_key("chosen") || obj.contains_key("rejected");
    let event_id = match obj.get("event_id") {
        None | Some(Value::Null) if trl => fallback_id.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => req_str(obj, "event_id")?,
    };
    let prompt = req_str(obj, "prompt")?;
    let (response_0, response_1, label) = if trl {
        // TRL form: {prompt, chosen, rejected}; the chosen one becomes response_1, label 1.
        if obj.contains_key("response_0") || obj.contains_key("response_1") {
            return Err(DecodeError::new(
                "invalid value: both TRL fields (chosen/rejected) and response_0/response_1 given",
            ));
        }
        let chosen = req_str(obj, "chosen")?;
        let rejected = req_str(obj, "rejected")?;
        (rejected, chosen, 1u8)
    } else {
        let r0 = req_str(obj, "response_0")?;
        let r1 = req_str(obj, "response_1")?;
        let label = match obj.get("label") {
            None | Some(Value::Null) => return Err(DecodeError::new("missing field `label`")),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(0), _) => 0,
                (Some(1), _) => 1,
                (_, Some(0.0)) => 0,
                (_, Some(1.0)) => 1,
                _ => {
                    return Err(DecodeError::new(format!(
                        "invalid value for `label`: must be 0 or 1, got {n}"
                    )))
                }
            },
            Some(Value::Bool(b)) => {
                return Err(DecodeError::new(format!(
                    "wrong type for `label`: expected 0 or 1, got boolean {b}"
                )))
            }
            Some(other) => {
                return Err(DecodeError::new(format!(
                    "wrong type for `label`: expected 0 or 1, got {}",
                    type_name(other)
                )))
            }
        };
        (r0, r1, label)
    };
    let ts = opt_str(obj, "ts")?;
    if let Some(t) = &ts {
        chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
            DecodeError::new(format!(
                "invalid value for `ts`: not RFC 3339 ({e}): {:?}",
                truncate(t, 40)
            ))
        })?;
    }
    let weight = opt_f64(obj, "weight")?;
    if let Some(w) = weight {
        if w <= 0.0 {
            return Err(DecodeError::new(format!(
                "invalid value for `weight`: must be > 0, got {w}"
            )));
        }
    }
    let ref_logp_0 = opt_f64(obj, "ref_logp_0")?;
    let ref_logp_1 = opt_f64(obj, "ref_logp_1")?;
    if ref_logp_0.is_some() != ref_logp_1.is_some() {
        return Err(DecodeError::new(
            "invalid value: `ref_logp_0` and `ref_logp_1` must be given together",
        ));
    }
    for (k, v) in [("ref_logp_0", ref_logp_0), ("ref_logp_1", ref_logp_1)] {
        if let Some(x) = v {
            if x > 0.0 {
                return Err(DecodeError::new(format!(
                    "invalid value for `{k}`: a log-probability must be <= 0, got {x}"
                )));
            }
        }
    }
    Ok(PreferenceEvent {
        event_id,
        ts,
        prompt,
        response_0,
        response_1,
        label,
        weight,
        annotator: opt_str(obj, "annotator")?,
        policy_version: opt_str(obj, "policy_version")?,
        ref_logp_0,
        ref_logp_1,
    })
}

impl PreferenceEvent {
    /// Encode as compact JSON (the wire form `spoke produce` publishes).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("event serialises")
    }
    /// The event's weight (1 when absent).
    pub fn weight_or_one(&self) -> f64 {
        self.weight.unwrap_or(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> PreferenceEvent {
        decode_event(s.as_bytes(), "fb").unwrap()
    }
    fn err(s: &[u8]) -> String {
        decode_event(s, "fb").unwrap_err().0
    }

    #[test]
    fn valid_full_event() {
        let e = ok(
            r#"{"event_id":"a","ts":"2026-01-02T03:04:05Z","prompt":"p","response_0":"x","response_1":"y","label":1,"weight":0.5,"annotator":"u","policy_version":"v3","ref_logp_0":-3.5,"ref_logp_1":-2}"#,
        );
        assert_eq!(e.label, 1);
        assert_eq!(e.weight, Some(0.5));
        assert_eq!(e.ref_logp_1, Some(-2.0));
    }

    #[test]
    fn trl_form_implies_label() {
        let e = ok(r#"{"prompt":"p","chosen":"good","rejected":"bad"}"#);
        assert_eq!(e.label, 1);
        assert_eq!(e.response_1, "good");
        assert_eq!(e.response_0, "bad");
        assert_eq!(e.event_id, "fb");
    }

    #[test]
    fn confluent_framing_is_stripped() {
        let mut b = vec![0u8, 0, 0, 0, 7];
        b.extend_from_slice(
            br#"{"event_id":"a","prompt":"p","response_0":"x","response_1":"y","label":0}"#,
        );
        assert_eq!(decode_event(&b, "fb").unwrap().label, 0);
        assert!(err(&[0, 1]).starts_with("confluent"));
    }

    #[test]
    fn rejections_name_the_field() {
        assert!(
            err(br#"{"event_id":"a","prompt":"p","response_1":"y","label":0}"#)
                .contains("missing field `response_0`")
        );
        assert!(
            err(br#"{"event_id":"a","prompt":5,"response_0":"x","response_1":"y","label":0}"#)
                .contains("wrong type for `prompt`")
        );
        assert!(err(
            br#"{"event_id":"a","prompt":"p","response_0":"x","response_1":"y","label":2}"#
        )
        .contains("`label`: must be 0 or 1"));
        assert!(err(br#"{"event_id":"a","prompt":"p","response_0":"x","response_1":"y","label":1,"weight":-1}"#)
            .contains("`weight`"));
        assert!(err(br#"{"event_id":"a","prompt":"p","response_0":"x","response_1":"y","label":1,"weight":"NaN"}"#)
            .contains("`weight`"));
        assert!(err(
            br#"{"event_id":"a","prompt":" ","response_0":"x","response_1":"y","label":1}"#
        )
        .contains("empty field `prompt`"));
        assert!(err(b"{\"event_id\":\"a\",\"prompt\":\"\xff\"}").starts_with("invalid UTF-8"));
        assert!(err(b"[1,2]").starts_with("not a JSON object"));
        assert!(err(b"{oops").starts_with("invalid JSON"));
        assert!(err(br#"{"event_id":"a","ts":"yesterday","prompt":"p","response_0":"x","response_1":"y","label":1}"#)
            .contains("`ts`"));
    }
}

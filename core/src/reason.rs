//! Why a reading was rejected: stable, machine-readable reason codes.
//!
//! The code is what lands in the dead-letter table's `reason` column and what users alert on,
//! so the spelling of each code is part of the public contract: never rename one. The class
//! (the part before `:`) is what metrics are labelled with, since it has low cardinality.

use std::borrow::Cow;
use std::fmt;

/// A reason a reading goes to the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The payload is not valid JSON (truncated, trailing garbage, wrong syntax).
    JsonSyntax,
    /// The payload is not valid UTF-8.
    InvalidUtf8,
    /// The payload is larger than the configured limit.
    TooLarge,
    /// The payload is JSON but not an object, or a batch's `readings` is not an array of objects.
    NotAnObject,
    /// A required field is absent (`missing_field:seq`).
    MissingField(Cow<'static, str>),
    /// A field has the wrong JSON type (`wrong_type:ts`), or a number outside its type (a
    /// negative or fractional `seq`).
    WrongType(Cow<'static, str>),
    /// A key appears twice in one object (`duplicate_key:seq`), so what is checked would not
    /// be what is stored.
    DuplicateKey(String),
    /// The `device_id` breaks the id rules (1–64 of `A-Z a-z 0-9 _ . : -`).
    InvalidDeviceId,
    /// The payload's `device_id` differs from the one the transport claims (the MQTT topic).
    TopicMismatch,
    /// The `type` is not one of the configured device types.
    UnknownDeviceType,
    /// The device is not in the registry and the configuration says to reject such devices.
    UnknownDevice,
    /// A metric name not defined for the device type (`unknown_metric:foo`).
    UnknownMetric(String),
    /// A metric outside its valid range, or not finite (`out_of_range:humidity_pct`).
    OutOfRange(String),
    /// A metric that must never decrease per device went down (`not_monotonic:energy_kwh`).
    NotMonotonic(String),
    /// `ts` is a string that is not RFC 3339, or an integer that is not plausible epoch ms.
    InvalidTimestamp,
    /// `ts` is more than the allowed skew (5 minutes) in the future.
    TsInFuture,
    /// `ts` is older than the configured lateness (default 7 days).
    TsTooOld,
    /// A batch message whose `readings` array is empty.
    EmptyBatch,
    /// A batch message with more readings than the configured limit.
    TooManyReadings,
    /// A Kinesis record that starts as a KPL aggregate but does not decode as one (bad
    /// protobuf, MD5 mismatch): the whole record is one dead letter, never guessed at.
    CorruptAggregate,
}

impl Reason {
    /// The reason class: the code without its detail, used as a metrics label.
    pub fn class(&self) -> &'static str {
        match self {
            Reason::JsonSyntax => "json_syntax",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::TooLarge => "too_large",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingField(_) => "missing_field",
            Reason::WrongType(_) => "wrong_type",
            Reason::DuplicateKey(_) => "duplicate_key",
            Reason::InvalidDeviceId => "invalid_device_id",
            Reason::TopicMismatch => "topic_mismatch",
            Reason::UnknownDeviceType => "unknown_device_type",
            Reason::UnknownDevice => "unknown_device",
            Reason::UnknownMetric(_) => "unknown_metric",
            Reason::OutOfRange(_) => "out_of_range",
            Reason::NotMonotonic(_) => "not_monotonic",
            Reason::InvalidTimestamp => "invalid_ts",
            Reason::TsInFuture => "ts_in_future",
            Reason::TsTooOld => "ts_too_old",
            Reason::EmptyBatch => "empty_batch",
            Reason::TooManyReadings => "too_many_readings",
            Reason::CorruptAggregate => "corrupt_aggregate",
        }
    }

    /// Whether a reading rejected for this reason went through de-duplication first.
    ///
    /// The transform checks, in order: the envelope (size, UTF-8, JSON, object, `device_id`,
    /// topic match, `type`), then `seq`, then the de-duplication gate on (device_id, seq), then
    /// everything else (`ts`, metrics, registry, monotonic rules). A reading rejected after the
    /// gate is recorded exactly once even when redelivered; one rejected before it cannot be
    /// recognised again and may land in the dead-letter table once per delivery.
    pub fn is_deduplicated(&self) -> bool {
        class_is_deduplicated(self.class(), self.detail())
    }

    fn detail(&self) -> Option<&str> {
        match self {
            Reason::MissingField(x) | Reason::WrongType(x) => Some(x),
            _ => None,
        }
    }

    /// The full, stable code written to the `reason` column, e.g. `missing_field:seq`.
    pub fn code(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::MissingField(x) | Reason::WrongType(x) => {
                write!(f, "{}:{}", self.class(), sanitize_detail(x))
            }
            Reason::DuplicateKey(x)
            | Reason::UnknownMetric(x)
            | Reason::OutOfRange(x)
            | Reason::NotMonotonic(x) => write!(f, "{}:{}", self.class(), sanitize_detail(x)),
            _ => f.write_str(self.class()),
        }
    }
}

/// [`Reason::is_deduplicated`] for a code read back from the lake (`missing_field:ts`).
pub fn code_is_deduplicated(code: &str) -> bool {
    let (class, detail) = match code.split_once(':') {
        Some((c, d)) => (c, Some(d)),
        None => (code, None),
    };
    class_is_deduplicated(class, detail)
}

/// Fields checked before the de-duplication gate.
const ENVELOPE_FIELDS: &[&str] = &["device_id", "type", "seq", "readings"];

fn class_is_deduplicated(class: &str, detail: Option<&str>) -> bool {
    match class {
        "missing_field" | "wrong_type" => detail.is_some_and(|d| !ENVELOPE_FIELDS.contains(&d)),
        "unknown_device" | "unknown_metric" | "out_of_range" | "not_monotonic" | "invalid_ts"
        | "ts_in_future" | "ts_too_old" => true,
        _ => false,
    }
}

/// Keeps attacker-controlled names (an unknown metric, a duplicate key) printable and short
/// inside a reason code: at most 64 characters of `A-Z a-z 0-9 _ . -`, others become `?`.
fn sanitize_detail(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_carry_their_detail_and_classes_do_not() {
        assert_eq!(
            Reason::MissingField("seq".into()).code(),
            "missing_field:seq"
        );
        assert_eq!(Reason::MissingField("seq".into()).class(), "missing_field");
        assert_eq!(
            Reason::OutOfRange("humidity_pct".into()).code(),
            "out_of_range:humidity_pct"
        );
        assert_eq!(Reason::JsonSyntax.code(), "json_syntax");
    }

    #[test]
    fn only_checks_after_the_gate_are_deduplicated() {
        assert!(Reason::MissingField("ts".into()).is_deduplicated());
        assert!(!Reason::MissingField("seq".into()).is_deduplicated());
        assert!(Reason::OutOfRange("x".into()).is_deduplicated());
        assert!(!Reason::TopicMismatch.is_deduplicated());
        assert!(code_is_deduplicated("wrong_type:humidity_pct"));
        assert!(!code_is_deduplicated("json_syntax"));
    }

    #[test]
    fn hostile_detail_is_sanitized() {
        let r = Reason::UnknownMetric("a/b\n\u{202e}".repeat(40));
        let code = r.code();
        assert!(code.starts_with("unknown_metric:a?b??"));
        assert!(code.len() <= "unknown_metric:".len() + 64);
    }
}

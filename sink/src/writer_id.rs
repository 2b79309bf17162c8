//! [`WriterId`]: the validated name of one writing instance, part of every file name it makes.

use std::fmt;

use crate::SinkError;

/// The longest writer id allowed.
pub const MAX_WRITER_ID_LEN: usize = 64;

/// A writer id: 1-64 of `A-Z a-z 0-9 _ -`.
///
/// Writer ids go into paths (`part-<writer>-...`, `_sensorlake/commits/<writer>/`), so they are
/// validated once, here, and nothing else is ever allowed into a path segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriterId(String);

impl WriterId {
    /// Validates `id`.
    ///
    /// # Errors
    /// [`SinkError::InvalidWriterId`] when `id` is empty, longer than 64 bytes, or has any
    /// other character than `A-Z a-z 0-9 _ -`.
    pub fn try_new(id: &str) -> Result<Self, SinkError> {
        if is_valid(id) {
            Ok(Self(id.to_owned()))
        } else {
            Err(SinkError::InvalidWriterId { id: id.to_owned() })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `id` is a valid writer id.
pub(crate) fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_WRITER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl fmt::Display for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_id_rejects_path_tricks_empty_and_overlong_ids() {
        let long = "a".repeat(65);
        for bad in [
            "../x",
            "a/b",
            "",
            long.as_str(),
            "a b",
            "a.b",
            "é",
            "a\\b",
            "x\0",
        ] {
            assert!(
                matches!(
                    WriterId::try_new(bad),
                    Err(SinkError::InvalidWriterId { .. })
                ),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn writer_id_accepts_letters_digits_underscore_and_dash() {
        let max = "Z".repeat(64);
        for good in ["w0", "ingest-eu_1", "A", max.as_str()] {
            assert_eq!(WriterId::try_new(good).unwrap().as_str(), good);
        }
    }
}

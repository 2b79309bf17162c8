//! Kinesis sequence numbers: decimal strings of up to 128 digits (56 in practice), compared as
//! numbers without ever being parsed into a machine integer.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest sequence number accepted (Kinesis documents `0|([1-9]\d{0,128})`).
pub const MAX_DIGITS: usize = 129;

/// A Kinesis sequence number, kept as the service wrote it; shared, so that the user records
/// of one KPL aggregate and the checkpoint that follows them do not each copy it.
///
/// Ordering is numeric: leading zeros are ignored, a longer number is larger, numbers of the
/// same length compare digit by digit. `"9" < "10"`, which a string comparison gets wrong.
#[derive(Clone)]
pub struct SequenceNumber(std::sync::Arc<str>);

// Equality and hashing follow the numeric order: "007" == "7".
impl PartialEq for SequenceNumber {
    fn eq(&self, other: &Self) -> bool {
        self.significant() == other.significant()
    }
}

impl Eq for SequenceNumber {}

impl std::hash::Hash for SequenceNumber {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.significant().hash(state);
    }
}

/// A string that is not a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Kinesis sequence number (1-{MAX_DIGITS} decimal digits): {0:?}")]
pub struct InvalidSequenceNumber(pub String);

impl SequenceNumber {
    /// Validates `s`: 1 to [`MAX_DIGITS`] ASCII digits.
    ///
    /// # Errors
    /// [`InvalidSequenceNumber`] for anything else.
    pub fn parse(s: &str) -> Result<Self, InvalidSequenceNumber> {
        if s.is_empty() || s.len() > MAX_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidSequenceNumber(s.chars().take(140).collect()));
        }
        Ok(Self(s.into()))
    }

    /// The digits as the service wrote them.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without leading zeros ("0" for zero).
    fn significant(&self) -> &str {
        let t = self.0.trim_start_matches('0');
        if t.is_empty() { "0" } else { t }
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.significant(), other.significant());
        a.len().cmp(&b.len()).then_with(|| a.cmp(b))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

impl std::str::FromStr for SequenceNumber {
    type Err = InvalidSequenceNumber;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SequenceNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SequenceNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn compares_56_digit_numbers_numerically() {
        // Real kinesalite/AWS numbers: 56 digits, far beyond u128.
        let a = sn("49590338271490256608559692538361571095921575989136588898");
        let b = sn("49590338271490256608559692540925702759324208523137515618");
        assert!(a < b);
        assert!(
            sn("9") < sn("10"),
            "a string comparison would say otherwise"
        );
        assert_eq!(sn("007").cmp(&sn("7")), Ordering::Equal);
        assert_eq!(sn("007"), sn("7"), "equality agrees with the order");
        assert!(sn("0") < sn("1"));
        let long = "1".repeat(129);
        assert!(sn(&long) > a);
    }

    #[test]
    fn rejects_what_is_not_a_sequence_number() {
        for bad in ["", "12a", "-1", "1.5", " 1", "1e9", &"1".repeat(130)] {
            assert!(SequenceNumber::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn round_trips_through_json_as_a_string() {
        let a = sn("49590338271490256608559692538361571095921575989136588898");
        let j = serde_json::to_string(&a).expect("serializes");
        assert_eq!(
            j,
            "\"49590338271490256608559692538361571095921575989136588898\""
        );
        let back: SequenceNumber = serde_json::from_str(&j).expect("parses");
        assert_eq!(back, a);
        assert!(
            serde_json::from_str::<SequenceNumber>("123").is_err(),
            "numbers are not accepted"
        );
    }
}

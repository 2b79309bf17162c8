//! Stable 64-bit fingerprints, so the simulator and `verify` can compare what was sent with
//! what the lake holds without storing every value.
//!
//! These must never change between versions: a manifest written by one version is verified by
//! another. They are not cryptographic.

/// FNV-1a 64 of a byte string (used for raw payloads).
pub fn payload_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finaliser: a good bijective mix of one word.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fingerprint of one accepted reading: its seq, its event time in µs, and its metric
/// values in the device type's metric order (`None` for null).
///
/// A device's fingerprint is the wrapping sum of its readings' fingerprints, so it does not
/// depend on the order in which rows are read back.
pub fn reading_fingerprint(seq: u64, ts_us: i64, metrics: &[Option<f64>]) -> u64 {
    let mut h = mix64(seq ^ 0x5345_4e53_4f52_4c4b);
    h = mix64(h ^ ts_us as u64);
    for m in metrics {
        let bits = match m {
            // Normalise -0.0 and 0.0, which a JSON round trip may not preserve distinctly.
            Some(v) if *v == 0.0 => 0,
            Some(v) => v.to_bits(),
            None => 0x7ff8_dead_beef_0001,
        };
        h = mix64(h ^ bits);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_across_versions() {
        // Pinned values: changing them breaks every manifest already written.
        assert_eq!(payload_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(payload_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        let a = reading_fingerprint(1, 2, &[Some(1.5), None]);
        assert_eq!(a, reading_fingerprint(1, 2, &[Some(1.5), None]));
        assert_ne!(a, reading_fingerprint(1, 2, &[None, Some(1.5)]));
        assert_eq!(
            reading_fingerprint(1, 2, &[Some(0.0)]),
            reading_fingerprint(1, 2, &[Some(-0.0)])
        );
    }
}

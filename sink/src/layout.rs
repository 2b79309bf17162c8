//! Where everything lives in the lake, relative to its root, as `/`-separated strings.
//!
//! ```text
//! telemetry/date=YYYY-MM-DD/hour=HH/part-<writer>-<commit:010>-<n:04>.parquet
//! dead_letter/date=YYYY-MM-DD/part-<writer>-<commit:010>-<n:04>.parquet
//! _sensorlake/commits/<writer>/<commit:020>.json
//! _sensorlake/tmp/<writer>/<commit:020>/<n>.parquet
//! _sensorlake/locks/<writer>.lock
//! ```
//!
//! Every path is built from a validated [`WriterId`], integers, and dates computed from
//! integers; never from a value read out of a row. Temporary files live under `_sensorlake/`, so
//! a reader's glob over `telemetry/**/*.parquet` never matches one.

use sensorlake_core::time::format_date;

use crate::WriterId;
use crate::record::Table;

/// The folder of the lake's own bookkeeping.
pub(crate) const META_DIR: &str = "_sensorlake";
/// The folder of all writers' commit records.
pub(crate) const COMMITS_DIR: &str = "_sensorlake/commits";
/// The suffix of a commit record being written, before its rename.
pub(crate) const RECORD_TMP_SUFFIX: &str = ".json.tmp";

/// `_sensorlake/commits/<writer>`
pub(crate) fn commits_dir(w: &WriterId) -> String {
    format!("{COMMITS_DIR}/{w}")
}

/// `_sensorlake/commits/<writer>/<commit:020>.json`: the commit record, whose appearance is the
/// commit point.
pub(crate) fn commit_record(w: &WriterId, commit: u64) -> String {
    format!("{COMMITS_DIR}/{w}/{commit:020}.json")
}

/// The commit number of a commit record's file name (`<commit:020>.json`), or `None` for
/// anything else (temporary records included).
pub(crate) fn parse_commit_record_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".json")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `_sensorlake/tmp/<writer>`
pub(crate) fn tmp_writer_dir(w: &WriterId) -> String {
    format!("{META_DIR}/tmp/{w}")
}

/// `_sensorlake/tmp/<writer>/<commit:020>`
pub(crate) fn tmp_commit_dir(w: &WriterId, commit: u64) -> String {
    format!("{META_DIR}/tmp/{w}/{commit:020}")
}

/// `_sensorlake/tmp/<writer>/<commit:020>/<n>.parquet`
pub(crate) fn tmp_file(w: &WriterId, commit: u64, n: usize) -> String {
    format!("{META_DIR}/tmp/{w}/{commit:020}/{n}.parquet")
}

/// `_sensorlake/locks`
pub(crate) fn locks_dir() -> String {
    format!("{META_DIR}/locks")
}

/// `_sensorlake/locks/<writer>.lock`
pub(crate) fn lock_file(w: &WriterId) -> String {
    format!("{META_DIR}/locks/{w}.lock")
}

/// `part-<writer>-<commit:010>-<n:04>.parquet`
pub(crate) fn part_file_name(w: &WriterId, commit: u64, n: usize) -> String {
    format!("part-{w}-{commit:010}-{n:04}.parquet")
}

/// The partition folder of a telemetry hour, given as hours since the epoch:
/// `telemetry/date=YYYY-MM-DD/hour=HH`.
pub(crate) fn telemetry_partition(hour_index: i64) -> String {
    let date = format_date(hour_index.div_euclid(24));
    let hour = hour_index.rem_euclid(24);
    format!("{}/date={date}/hour={hour:02}", Table::Telemetry.dir())
}

/// The partition folder of a dead-letter day, given as days since the epoch:
/// `dead_letter/date=YYYY-MM-DD`.
pub(crate) fn dead_letter_partition(day_index: i64) -> String {
    format!(
        "{}/date={}",
        Table::DeadLetter.dir(),
        format_date(day_index)
    )
}

/// The folder part of a relative path (`a/b/c` → `a/b`), empty for a bare name.
pub(crate) fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Whether `path` is a relative path of plain segments: each non-empty, of
/// `A-Z a-z 0-9 _ - = .` and not `.` or `..`. Paths read back from commit records must pass
/// this before recovery touches them, so that a damaged record can never move a file outside
/// the lake.
pub(crate) fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'.'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_hive_folders_of_date_and_hour() {
        // 2026-11-27T15:00Z is day 20_784, hour 20_784 * 24 + 15.
        assert_eq!(
            telemetry_partition(20_784 * 24 + 15),
            "telemetry/date=2026-11-27/hour=15"
        );
        assert_eq!(telemetry_partition(-1), "telemetry/date=1969-12-31/hour=23");
        assert_eq!(dead_letter_partition(20_784), "dead_letter/date=2026-11-27");
    }

    #[test]
    fn commit_record_names_parse_only_when_exact() {
        let w = WriterId::try_new("w0").unwrap();
        let path = commit_record(&w, 42);
        assert_eq!(path, "_sensorlake/commits/w0/00000000000000000042.json");
        assert_eq!(
            parse_commit_record_name("00000000000000000042.json"),
            Some(42)
        );
        for bad in [
            "00000000000000000042.json.tmp",
            "42.json",
            "0000000000000000004x.json",
            "99999999999999999999.json",
            "00000000000000000042",
        ] {
            assert_eq!(parse_commit_record_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn plain_relative_paths_exclude_traversal() {
        assert!(is_plain_relative(
            "telemetry/date=2026-11-27/hour=15/part-w0-0000000001-0000.parquet"
        ));
        for bad in ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "a b", "a/"] {
            assert!(!is_plain_relative(bad), "{bad:?}");
        }
    }
}

//! Where everything lives in the lake, relative to its root, as `/`-separated strings.
//!
//! ```text
//! telemetry/date=YYYY-MM-DD/hour=HH/part-<writer>-<commit:010>-<n:04>.parquet
//! dead_letter/date=YYYY-MM-DD/part-<writer>-<commit:010>-<n:04>.parquet
//! _sensorlake/commits/<writer>/<commit:020>.json
//! _sensorlake/tmp/<writer>/<commit:020>/<n>.parquet
//! _sensorlake/locks/<writer>.lock
//! telemetry/date=YYYY-MM-DD/hour=HH/compact-<compaction:010>-<k:04>.parquet
//! dead_letter/date=YYYY-MM-DD/compact-<compaction:010>-<k:04>.parquet
//! _sensorlake/compactions/<compaction:020>.json
//! _sensorlake/compactions/tmp/<compaction:020>/<k>.parquet
//! _sensorlake/compactions/compactor.lease
//! ```
//!
//! Every path is built from a validated [`WriterId`], integers, and dates computed from
//! integers; never from a value read out of a row. Temporary files live under `_sensorlake/`, so
//! a reader's glob over `telemetry/**/*.parquet` never matches one. The compactor's files can
//! never collide with a writer's: its outputs start with `compact-` where a writer's start with
//! `part-`, and its bookkeeping lives in `_sensorlake/compactions/`, a folder no writer uses.

use sensorlake_core::time::{days_from_civil, format_date};

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

/// `_sensorlake/snapshots/<writer>`
pub(crate) fn snapshots_dir(w: &WriterId) -> String {
    format!("{META_DIR}/snapshots/{w}")
}

/// `_sensorlake/snapshots/<writer>/<commit:020>.json`: the writer's folded state (device
/// checkpoints, counts) up to and including that commit, so recovery need not read every
/// record. The same name pattern as commit records.
pub(crate) fn snapshot(w: &WriterId, commit: u64) -> String {
    format!("{META_DIR}/snapshots/{w}/{commit:020}.json")
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

/// The folder of the compaction records, the compactor's temporary files and its lease.
pub(crate) const COMPACTIONS_DIR: &str = "_sensorlake/compactions";

/// `_sensorlake/compactions/<compaction:020>.json`: the compaction record, whose appearance is
/// the compaction's commit point.
pub(crate) fn compaction_record(compaction: u64) -> String {
    format!("{COMPACTIONS_DIR}/{compaction:020}.json")
}

/// `_sensorlake/compactions/tmp`
pub(crate) fn compaction_tmp_dir() -> String {
    format!("{COMPACTIONS_DIR}/tmp")
}

/// `_sensorlake/compactions/tmp/<compaction:020>`
pub(crate) fn compaction_tmp_files_dir(compaction: u64) -> String {
    format!("{COMPACTIONS_DIR}/tmp/{compaction:020}")
}

/// `_sensorlake/compactions/tmp/<compaction:020>/<k>.parquet`
pub(crate) fn compaction_tmp_file(compaction: u64, k: usize) -> String {
    format!("{COMPACTIONS_DIR}/tmp/{compaction:020}/{k}.parquet")
}

/// `_sensorlake/compactions/compactor.lease`: held by the one compaction running (a file lock
/// locally, an object created with a conditional put on an object store).
pub(crate) fn compactor_lease() -> String {
    format!("{COMPACTIONS_DIR}/compactor.lease")
}

/// `compact-<compaction:010>-<k:04>.parquet`
pub(crate) fn compact_file_name(compaction: u64, k: usize) -> String {
    format!("compact-{compaction:010}-{k:04}.parquet")
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

/// The day (since the epoch) of a partition folder name `date=YYYY-MM-DD`, or `None` for
/// anything else (including dates that do not exist).
pub(crate) fn parse_date_dir(name: &str) -> Option<i64> {
    let date = name.strip_prefix("date=")?;
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = date.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let day = days_from_civil(i64::from(y), m, d);
    // A date like 2026-02-30 maps to another day; formatting it back tells.
    (format_date(day) == date).then_some(day)
}

/// The hour of a partition folder name `hour=HH` (00-23), or `None` for anything else.
pub(crate) fn parse_hour_dir(name: &str) -> Option<i64> {
    let hour = name.strip_prefix("hour=")?;
    if hour.len() != 2 || !hour.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hour: i64 = hour.parse().ok()?;
    (hour < 24).then_some(hour)
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
    fn partition_folder_names_parse_back_to_their_day_and_hour() {
        assert_eq!(parse_date_dir("date=2026-11-27"), Some(20_784));
        assert_eq!(parse_date_dir("date=1969-12-31"), Some(-1));
        assert_eq!(parse_hour_dir("hour=15"), Some(15));
        assert_eq!(parse_hour_dir("hour=00"), Some(0));
        for bad in [
            "date=2026-02-30",
            "date=2026-13-01",
            "date=2026-1-01",
            "date=+026-01-01",
            "dt=2026-01-01",
            "date=2026-01-01x",
        ] {
            assert_eq!(parse_date_dir(bad), None, "{bad}");
        }
        for bad in ["hour=24", "hour=5", "hour=+5", "hour=-1", "h=05"] {
            assert_eq!(parse_hour_dir(bad), None, "{bad}");
        }
    }

    #[test]
    fn compactor_paths_cannot_collide_with_a_writers() {
        // Writer ids are `A-Z a-z 0-9 _ -` only: no writer id can be `compactions`' sibling
        // names, and no writer file starts with `compact-`.
        assert_eq!(
            compaction_record(7),
            "_sensorlake/compactions/00000000000000000007.json"
        );
        assert_eq!(
            compaction_tmp_file(7, 2),
            "_sensorlake/compactions/tmp/00000000000000000007/2.parquet"
        );
        assert_eq!(compact_file_name(7, 2), "compact-0000000007-0002.parquet");
        let w = WriterId::try_new("compact").unwrap();
        assert!(!part_file_name(&w, 7, 2).starts_with("compact-"));
        assert!(!commits_dir(&w).starts_with(COMPACTIONS_DIR));
        assert!(!tmp_writer_dir(&w).starts_with(COMPACTIONS_DIR));
        assert!(!lock_file(&w).starts_with(COMPACTIONS_DIR));
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

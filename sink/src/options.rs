//! How the lake writes files: [`LakeOptions`], read from the `[sink]` section of the
//! configuration, with named defaults and a pure [`LakeOptions::validate`].

use serde::Deserialize;

use crate::SinkError;

/// Settings of the Parquet files a [`Lake`](crate::Lake) writes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeOptions {
    /// The most rows one file may hold. A partition that receives more rows in one flush is
    /// split into several files, so that one burst never makes a file too big to read in one
    /// go. Must be at least 1.
    #[serde(default = "default_max_rows_per_file")]
    pub max_rows_per_file: usize,
    /// The most rows in one Parquet row group (the writer's `max_row_group_row_count`). Row
    /// groups are the unit that engines skip by statistics and read in parallel; 128 Ki rows
    /// keeps them a few MB, sized for scans. Must be at least 1.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// The zstd compression level, 1 (fastest) to 22 (smallest). 3 is zstd's own default and a
    /// good trade-off for telemetry.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Whether to fsync files and directories. Without it a power loss can lose or truncate
    /// committed files, breaking "ack after commit"; only tests turn it off, for speed.
    #[serde(default = "default_fsync")]
    pub fsync: bool,
    /// A recovery snapshot (the writer's folded device state) is written after every this
    /// many commits, so that opening the lake reads one snapshot and fewer than this many
    /// commit records. Lower it where the lake is opened often, as the Lambda function opens
    /// it on every invocation. Must be at least 1.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
}

fn default_snapshot_every() -> u64 {
    if cfg!(test) { 4 } else { 1_000 }
}

fn default_max_rows_per_file() -> usize {
    1_000_000
}

fn default_row_group_rows() -> usize {
    131_072
}

fn default_zstd_level() -> i32 {
    3
}

fn default_fsync() -> bool {
    true
}

impl Default for LakeOptions {
    fn default() -> Self {
        Self {
            max_rows_per_file: default_max_rows_per_file(),
            row_group_rows: default_row_group_rows(),
            zstd_level: default_zstd_level(),
            fsync: default_fsync(),
            snapshot_every: default_snapshot_every(),
        }
    }
}

impl LakeOptions {
    /// Checks every value is in range.
    ///
    /// # Errors
    /// [`SinkError::InvalidOptions`] naming the first bad field.
    pub fn validate(&self) -> Result<(), SinkError> {
        if self.max_rows_per_file == 0 {
            return Err(SinkError::InvalidOptions {
                field: "max_rows_per_file",
                why: "must be at least 1".into(),
            });
        }
        if self.row_group_rows == 0 {
            return Err(SinkError::InvalidOptions {
                field: "row_group_rows",
                why: "must be at least 1".into(),
            });
        }
        if self.snapshot_every == 0 {
            return Err(SinkError::InvalidOptions {
                field: "snapshot_every",
                why: "must be at least 1".into(),
            });
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(SinkError::InvalidOptions {
                field: "zstd_level",
                why: format!("must be 1 to 22, not {}", self.zstd_level),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_their_defaults() {
        let o: LakeOptions = serde_json::from_str(r#"{"zstd_level": 9}"#).unwrap();
        assert_eq!(
            o,
            LakeOptions {
                zstd_level: 9,
                ..LakeOptions::default()
            }
        );
        assert!(o.validate().is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(serde_json::from_str::<LakeOptions>(r#"{"zstd": 9}"#).is_err());
    }

    #[test]
    fn validate_names_the_bad_field() {
        for (o, field) in [
            (
                LakeOptions {
                    max_rows_per_file: 0,
                    ..Default::default()
                },
                "max_rows_per_file",
            ),
            (
                LakeOptions {
                    row_group_rows: 0,
                    ..Default::default()
                },
                "row_group_rows",
            ),
            (
                LakeOptions {
                    zstd_level: 23,
                    ..Default::default()
                },
                "zstd_level",
            ),
        ] {
            match o.validate() {
                Err(SinkError::InvalidOptions { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected InvalidOptions for {field}, got {other:?}"),
            }
        }
    }
}

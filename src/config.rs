//! Configuration: one TOML file, every key optional, overridable from the environment.
//!
//! Three steps, as everywhere in sensorlake: [`Config::load`] reads the raw file (unknown keys
//! are errors) and applies `SENSORLAKE_<SECTION>__<KEY>` environment overrides, then
//! [`Config::validate`] checks everything without touching the network, and the pipeline
//! builds and runs from the validated result. Secrets never come from the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sensorlake_core::{DeviceTypeSpec, TelemetrySchema};
use sensorlake_ingest::MqttConfig;
use sensorlake_ingest::kinesis::KinesisConfig;
use sensorlake_sink::LakeOptions;
use sensorlake_transform::TransformConfig;
use serde::{Deserialize, Serialize};

/// The environment variable prefix for overrides: `SENSORLAKE_MQTT__URL=mqtt://...`.
pub const ENV_PREFIX: &str = "SENSORLAKE_";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[mqtt]`: the broker and subscription.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// `[kinesis]`: a Kinesis stream to read instead of MQTT (when `stream` is set).
    #[serde(default)]
    pub kinesis: KinesisConfig,
    /// `[lake]`: where and how to write.
    #[serde(default)]
    pub lake: LakeConfig,
    /// `[flush]`: when a batch is committed (and acknowledged).
    #[serde(default)]
    pub flush: FlushConfig,
    /// `[transform]`: validation limits and policies.
    #[serde(default)]
    pub transform: TransformConfig,
    /// `[registry]`: the device registry used for enrichment.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// `[[device_types]]`: replaces the three default telemetry v1 types when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_types: Option<Vec<DeviceTypeSpec>>,
    /// `[metrics]`: the Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[shutdown]`: how long a graceful stop may take.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

/// `[lake]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// The lake: a folder (created if missing), `file://…`, `s3://bucket/prefix`,
    /// `az://container/prefix` or `gs://bucket/prefix` (each configured by its cloud's standard
    /// environment variables).
    #[serde(default = "default_lake_path")]
    pub path: PathBuf,
    /// This instance's writer id: names its files and commit records and derives the MQTT
    /// client id. Two running instances on one lake need different writer ids.
    #[serde(default = "default_writer_id")]
    pub writer_id: String,
    /// Split a partition's rows of one flush into files of at most this many rows.
    #[serde(default = "default_max_rows_per_file")]
    pub max_rows_per_file: usize,
    /// Rows per Parquet row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// Zstandard level (1-22).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// fsync files and directories before they become visible. Only tests turn this off.
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// How long commits may keep failing (storage down, disk full) before the process gives
    /// up and exits with status 1, leaving everything uncommitted unacknowledged for the next
    /// start. 0 (the default): keep retrying for as long as it takes, logging every attempt.
    #[serde(default)]
    pub retry_budget_secs: u64,
    /// A recovery snapshot every this many commits of a writer: opening the lake reads at most
    /// this many commit records. The Lambda function, which opens the lake on every
    /// invocation, runs with a low value (its template sets 20).
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
}

fn default_lake_path() -> PathBuf {
    PathBuf::from("lake")
}
fn default_writer_id() -> String {
    "w0".into()
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
fn default_snapshot_every() -> u64 {
    1_000
}
fn default_true() -> bool {
    true
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            path: default_lake_path(),
            writer_id: default_writer_id(),
            max_rows_per_file: default_max_rows_per_file(),
            row_group_rows: default_row_group_rows(),
            zstd_level: default_zstd_level(),
            fsync: true,
            retry_budget_secs: 0,
            snapshot_every: default_snapshot_every(),
        }
    }
}

impl LakeConfig {
    /// The sink's options.
    pub fn options(&self) -> LakeOptions {
        LakeOptions {
            max_rows_per_file: self.max_rows_per_file,
            row_group_rows: self.row_group_rows,
            zstd_level: self.zstd_level,
            fsync: self.fsync,
            snapshot_every: self.snapshot_every,
        }
    }
}

/// `[flush]`: a flush (commit, then acknowledge) starts when any limit is reached.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushConfig {
    /// The oldest pending message waits at most this long (ms) before it is committed.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
    /// At most this many messages per flush. Unset: half the MQTT in-flight window (MQTT 5:
    /// half of `mqtt.receive_maximum`; MQTT 3.1.1: 10,000, lowered automatically when the
    /// broker's window turns out smaller).
    #[serde(default)]
    pub max_messages: Option<usize>,
    /// At most this many payload bytes per flush.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

fn default_max_age_ms() -> u64 {
    5_000
}
fn default_max_bytes() -> usize {
    64 << 20
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            max_age_ms: default_max_age_ms(),
            max_messages: None,
            max_bytes: default_max_bytes(),
        }
    }
}

/// `[registry]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// CSV file `device_id,site,model,firmware,lat,lon,installed_at`. Unset: no enrichment.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on this address (`127.0.0.1:9898`). Unset: no endpoint.
    #[serde(default)]
    pub addr: Option<SocketAddr>,
}

/// `[shutdown]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGINT/SIGTERM: stop intake, commit, acknowledge and exit within this many seconds;
    /// past it, exit non-zero without acknowledging what is not committed.
    #[serde(default = "default_shutdown_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_shutdown_timeout_secs() -> u64 {
    30
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout_secs: default_shutdown_timeout_secs(),
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// The file, or the environment.
        origin: String,
        /// The parser's explanation, with the key.
        message: String,
    },
    /// A value that cannot work.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path` (if given), then applies `SENSORLAKE_<SECTION>__<KEY>` overrides from
    /// `env` (pass `std::env::vars()`).
    ///
    /// # Errors
    /// An unreadable file, bad TOML, an unknown key or a value of the wrong type.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_owned()),
        };
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
        let mut password = None;
        let mut env_keys = BTreeMap::new();
        for (k, v) in env {
            let Some(rest) = k.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            if section == "mqtt" && key == "password" {
                password = Some(v);
                continue;
            }
            env_keys.insert(format!("{ENV_PREFIX}{}", rest), (section, key, v));
        }
        for (var, (section, key, value)) in env_keys {
            let entry = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = entry else {
                return Err(ConfigError::Parse {
                    origin: var,
                    message: format!("`{section}` is not a section"),
                });
            };
            t.insert(key, env_value(&value));
        }
        let mut config: Config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                origin: if origin == "(defaults)" {
                    "(environment overrides)".into()
                } else {
                    origin
                },
                message: e.to_string(),
            })?;
        if let Some(p) = password {
            config.mqtt.password = Some(p);
        } else if let Some(file) = &config.mqtt.password_file {
            let p = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            config.mqtt.password = Some(p.trim_end_matches(['\r', '\n']).to_owned());
        }
        Ok(config)
    }

    /// Checks every value that can be checked without the network, and builds the schema.
    ///
    /// # Errors
    /// The first value that cannot work, naming its key.
    pub fn validate(&self) -> Result<TelemetrySchema, ConfigError> {
        self.mqtt
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.kinesis
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let schema = TelemetrySchema::try_new(
            self.device_types
                .clone()
                .unwrap_or_else(DeviceTypeSpec::defaults),
        )
        .map_err(|e| ConfigError::Invalid(format!("device_types: {e}")))?;
        let w = &self.lake.writer_id;
        if w.is_empty()
            || w.len() > 64
            || !w
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::Invalid(format!(
                "lake.writer_id `{w}` must be 1-64 of A-Z a-z 0-9 _ -"
            )));
        }
        if self.flush.max_age_ms == 0 {
            return Err(ConfigError::Invalid(
                "flush.max_age_ms must be at least 1".into(),
            ));
        }
        if self.flush.max_messages == Some(0) {
            return Err(ConfigError::Invalid(
                "flush.max_messages must be at least 1".into(),
            ));
        }
        if !(1..=22).contains(&self.lake.zstd_level) {
            return Err(ConfigError::Invalid(format!(
                "lake.zstd_level {} must be 1-22",
                self.lake.zstd_level
            )));
        }
        if self.lake.row_group_rows == 0 || self.lake.max_rows_per_file == 0 {
            return Err(ConfigError::Invalid(
                "lake.row_group_rows and lake.max_rows_per_file must be at least 1".into(),
            ));
        }
        if self.mqtt.max_packet_bytes < self.transform.max_payload_bytes + 1024 {
            return Err(ConfigError::Invalid(format!(
                "mqtt.max_packet_bytes ({}) must exceed transform.max_payload_bytes ({}) so that \
                 oversize messages become dead letters instead of breaking the connection",
                self.mqtt.max_packet_bytes, self.transform.max_payload_bytes
            )));
        }
        Ok(schema)
    }

    /// The MQTT client id: configured, or derived from the writer id so it is stable.
    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sensorlake-{}", self.lake.writer_id))
    }

    /// The flush age limit.
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.flush.max_age_ms)
    }

    /// The effective configuration as TOML (secrets left out).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Reads an environment value as a TOML value when it parses as one (numbers, booleans,
/// arrays), else as a string.
fn env_value(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_validate_without_a_file() {
        let c = Config::load(None, env(&[])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.client_id(), "sensorlake-w0");
        assert_eq!(c.mqtt.qos, 1);
    }

    #[test]
    fn environment_overrides_file_values_and_types() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[mqtt]\nurl = \"mqtt://a:1\"\n[flush]\nmax_age_ms = 10\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&p),
            env(&[
                ("SENSORLAKE_MQTT__URL", "mqtt://b:2"),
                ("SENSORLAKE_FLUSH__MAX_AGE_MS", "250"),
                ("SENSORLAKE_MQTT__TOPICS", "[\"a/#\", \"b/#\"]"),
                ("SENSORLAKE_MQTT__PASSWORD", "s3cret"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.mqtt.url, "mqtt://b:2");
        assert_eq!(c.flush.max_age_ms, 250);
        assert_eq!(c.mqtt.topics, ["a/#", "b/#"]);
        assert_eq!(c.mqtt.password.as_deref(), Some("s3cret"));
        assert!(!c.to_toml().contains("s3cret"));
    }

    #[test]
    fn kinesis_settings_come_from_the_file_and_the_environment_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[kinesis]\nstream = \"telemetry\"\nstart_position = \"latest\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&p),
            env(&[("SENSORLAKE_KINESIS__LEASE_TABLE", "sensorlake-leases")]),
        )
        .unwrap();
        assert_eq!(c.kinesis.stream.as_deref(), Some("telemetry"));
        assert_eq!(
            c.kinesis.start_position,
            sensorlake_ingest::kinesis::StartPosition::Latest
        );
        assert_eq!(c.kinesis.lease_table.as_deref(), Some("sensorlake-leases"));
        assert!(c.validate().is_ok());
        assert!(c.to_toml().contains("[kinesis]"));
        let bad =
            Config::load(None, env(&[("SENSORLAKE_KINESIS__POLL_INTERVAL_MS", "50")])).unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("kinesis.poll_interval_ms"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[mqtt]\nurll = \"x\"\n").unwrap();
        let e = Config::load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(e.contains("urll"), "{e}");
        assert!(e.contains("c.toml"), "{e}");
    }

    #[test]
    fn reads_the_mqtt_tls_table_and_names_unknown_keys_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[mqtt]\nurl = \"mqtts://broker.example\"\n[mqtt.tls]\nca_file = \"/etc/ca.pem\"\n\
             server_name = \"b.example\"\nalpn = [\"x-amzn-mqtt-ca\"]\n",
        )
        .unwrap();
        let c = Config::load(Some(&p), env(&[])).unwrap();
        let tls = c.mqtt.tls.as_ref().unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("b.example"));
        assert_eq!(tls.alpn, ["x-amzn-mqtt-ca"]);
        assert_eq!(tls.client_cert_file, None);
        // The effective configuration shows the table, paths only.
        assert!(c.to_toml().contains("[mqtt.tls]"), "{}", c.to_toml());
        // The file is read at validation: a missing CA file is a config error naming it.
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("mqtt.tls.ca_file: cannot read /etc/ca.pem"),
            "{e}"
        );

        std::fs::write(&p, "[mqtt.tls]\ninsecure = true\n").unwrap();
        let e = Config::load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(e.contains("insecure"), "{e}");
    }

    #[test]
    fn rejects_a_packet_limit_below_the_payload_limit() {
        let c = Config::load(None, env(&[("SENSORLAKE_MQTT__MAX_PACKET_BYTES", "4096")])).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_packet_bytes"), "{e}");
    }

    #[test]
    fn rejects_path_like_writer_ids() {
        let c = Config::load(None, env(&[("SENSORLAKE_LAKE__WRITER_ID", "../x")])).unwrap();
        assert!(c.validate().is_err());
    }
}

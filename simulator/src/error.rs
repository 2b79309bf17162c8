//! The simulator's errors: one variant per cause, each saying what failed, where, and what to
//! check.

use std::path::PathBuf;
use std::time::Duration;

use crate::manifest::Manifest;

/// Everything that can go wrong in `simulate`, the manifest, or `verify`.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The options make no sense (zero devices, QoS 2, a rate of 0, an ARN that is not a
    /// stream's); nothing was sent.
    #[error("invalid simulator options: {0}")]
    InvalidOptions(String),

    /// The first connection to the broker failed; nothing was sent.
    #[error("could not connect to the MQTT broker at {addr}: {source}; {hint}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What to check, depending on how it failed.
        hint: &'static str,
        /// What rumqttc reported.
        #[source]
        source: Box<rumqttc::ConnectionError>,
    },

    /// The broker answered but refused the session; nothing was sent.
    #[error(
        "the MQTT broker at {addr} refused the connection ({code}); check that it accepts this \
         client id and anonymous clients (mosquitto: `allow_anonymous true`), or its ACLs"
    )]
    Refused {
        /// `host:port`.
        addr: String,
        /// The CONNACK return code.
        code: String,
    },

    /// The connection broke during the run. The manifest inside holds only what the broker
    /// confirmed before that; the rest is listed as unconfirmed.
    #[error(
        "lost the connection to the MQTT broker at {addr} after {confirmed} confirmed messages: \
         {source}; {unconfirmed} messages were not confirmed and are left out of the manifest \
         (it lists them as unconfirmed)"
    )]
    ConnectionLost {
        /// `host:port`.
        addr: String,
        /// Messages confirmed before the loss.
        confirmed: u64,
        /// Messages handed to the client but never confirmed.
        unconfirmed: u64,
        /// What rumqttc reported.
        #[source]
        source: Box<rumqttc::ConnectionError>,
        /// What was confirmed, for the caller to write anyway.
        manifest: Box<Manifest>,
    },

    /// Some messages were never acknowledged (QoS 1) or never sent (QoS 0) within the wait.
    /// The manifest inside holds only the confirmed ones.
    #[error(
        "{unconfirmed} of {total} messages were not confirmed by the MQTT broker at {addr} within \
         {waited:?}; they are left out of the manifest (it lists them as unconfirmed); check the \
         broker's load and limits (mosquitto: `max_inflight_messages`, `max_queued_messages`)"
    )]
    Unconfirmed {
        /// `host:port`.
        addr: String,
        /// Messages never confirmed.
        unconfirmed: u64,
        /// Messages handed to the client.
        total: u64,
        /// How long the run waited for the last confirmations.
        waited: Duration,
        /// What was confirmed, for the caller to write anyway.
        manifest: Box<Manifest>,
    },

    /// No AWS region is configured for Kinesis; nothing was sent.
    #[error(
        "no AWS region for Kinesis stream {stream}: set AWS_REGION (or `region` in the AWS \
         profile), or give the stream's ARN, which names its region"
    )]
    KinesisNoRegion {
        /// The stream's name or ARN.
        stream: String,
    },

    /// No AWS credentials were found for Kinesis; nothing was sent.
    #[error(
        "no AWS credentials for Kinesis stream {stream}: {detail}; set AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a local kinesalite takes any non-empty values)"
    )]
    KinesisCredentials {
        /// The stream's name or ARN.
        stream: String,
        /// What the credential chain reported.
        detail: String,
    },

    /// The stream does not exist where the endpoint and region point; nothing was sent.
    #[error(
        "Kinesis stream {stream} does not exist at {endpoint}: create it (`aws kinesis \
         create-stream --stream-name NAME --shard-count N`), or check the name, AWS_REGION and \
         AWS_ENDPOINT_URL_KINESIS"
    )]
    KinesisStreamNotFound {
        /// The stream's name or ARN.
        stream: String,
        /// The endpoint asked.
        endpoint: String,
    },

    /// The stream exists but takes no records (CREATING, DELETING); nothing was sent.
    #[error("Kinesis stream {stream} at {endpoint} is {status}; wait until it is ACTIVE")]
    KinesisStreamNotActive {
        /// The stream's name or ARN.
        stream: String,
        /// The endpoint asked.
        endpoint: String,
        /// Its status.
        status: String,
    },

    /// The Kinesis endpoint did not answer; nothing was sent.
    #[error(
        "could not reach Kinesis at {endpoint} for stream {stream}: {detail}; check \
         AWS_ENDPOINT_URL_KINESIS (or AWS_ENDPOINT_URL) and AWS_REGION, and that the service \
         (or kinesalite) is running and reachable"
    )]
    KinesisUnreachable {
        /// The stream's name or ARN.
        stream: String,
        /// The endpoint tried.
        endpoint: String,
        /// The transport failure and its causes.
        detail: String,
    },

    /// Kinesis refused a request before anything was sent (access denied, a bad signature, an
    /// invalid argument).
    #[error("Kinesis {op} on stream {stream} at {endpoint} failed: {detail}; {hint}")]
    KinesisRequest {
        /// The operation, e.g. `DescribeStreamSummary`.
        op: &'static str,
        /// The stream's name or ARN.
        stream: String,
        /// The endpoint asked.
        endpoint: String,
        /// The service's error code and message, or the transport failure.
        detail: String,
        /// What to check.
        hint: &'static str,
    },

    /// Publishing to Kinesis stopped part-way (the stream went away, access was revoked, or no
    /// call succeeded for a long time). The manifest inside holds what Kinesis confirmed.
    #[error(
        "publishing to Kinesis stream {stream} at {endpoint} stopped after {confirmed} confirmed \
         messages: {reason}; {unconfirmed} messages were not confirmed and are left out of the \
         manifest (it lists them as unconfirmed)"
    )]
    KinesisFailed {
        /// The stream's name or ARN.
        stream: String,
        /// The endpoint.
        endpoint: String,
        /// Messages confirmed before it stopped.
        confirmed: u64,
        /// Messages taken but never confirmed.
        unconfirmed: u64,
        /// What failed, and what to check.
        reason: String,
        /// What was confirmed, for the caller to write anyway.
        manifest: Box<Manifest>,
    },

    /// Some messages were not written to the stream within the wait (their PutRecords entries
    /// kept failing, or the run was stopped). The manifest inside holds the confirmed ones.
    #[error(
        "{unconfirmed} of {total} messages were not confirmed by Kinesis stream {stream} at \
         {endpoint} within {waited:?}; they are left out of the manifest (it lists them as \
         unconfirmed); check the stream's shards against the rate (a shard takes 1,000 records \
         or 1 MiB per second) and its throttling"
    )]
    KinesisUnconfirmed {
        /// The stream's name or ARN.
        stream: String,
        /// The endpoint.
        endpoint: String,
        /// Messages never confirmed.
        unconfirmed: u64,
        /// Messages taken by the transport.
        total: u64,
        /// How long the run waited for the last confirmations.
        waited: Duration,
        /// What was confirmed, for the caller to write anyway.
        manifest: Box<Manifest>,
    },

    /// A manifest file could not be read or written.
    #[error("failed to {op} manifest {}: {source}", path.display())]
    ManifestIo {
        /// `read`, `write` or `rename`.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A manifest file is not valid JSON of the expected shape.
    #[error(
        "{} is not a sensorlake manifest: {source}; pass the file written by `sensorlake simulate \
         --manifest`",
        path.display()
    )]
    ManifestFormat {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A manifest of a version this build does not know.
    #[error(
        "manifest {} has version {found}, this build reads version {supported}; verify with the \
         sensorlake version that wrote it",
        path.display()
    )]
    ManifestVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The version this build writes and reads.
        supported: u32,
    },

    /// The manifest contradicts itself (counts that do not match its seq ranges, a bad
    /// fingerprint string).
    #[error("the manifest is inconsistent: {0}; was it edited by hand?")]
    ManifestInconsistent(String),

    /// The lake directory does not exist.
    #[error("lake directory {} does not exist; pass the directory the pipeline writes to", path.display())]
    LakeNotFound {
        /// The directory.
        path: PathBuf,
    },

    /// A directory of the lake could not be listed.
    #[error("failed to list lake directory {}: {source}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A Parquet file could not be opened or decoded.
    #[error(
        "failed to read Parquet file {}: {source}; the file may be truncated or not written by \
         sensorlake (finished files never start with `.` or `_`)",
        path.display()
    )]
    ReadParquet {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A Parquet file lacks a column `verify` needs, or has it with an unusable type.
    #[error(
        "Parquet file {} has no usable column `{column}` ({detail}); is it a sensorlake {table} file \
         written with the same device types?",
        path.display()
    )]
    BadColumn {
        /// The file.
        path: PathBuf,
        /// `telemetry` or `dead-letter`.
        table: &'static str,
        /// The column.
        column: String,
        /// Missing, or its type.
        detail: String,
    },
}

impl SimError {
    /// The manifest of what was confirmed, when a run ended early or incompletely; the caller
    /// should still write it, so that `verify` can check what did arrive.
    pub fn partial_manifest(&self) -> Option<&Manifest> {
        match self {
            SimError::ConnectionLost { manifest, .. }
            | SimError::Unconfirmed { manifest, .. }
            | SimError::KinesisFailed { manifest, .. }
            | SimError::KinesisUnconfirmed { manifest, .. } => Some(manifest),
            _ => None,
        }
    }
}

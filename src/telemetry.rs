//! The metrics sensorlake exports, in Prometheus format, and their one place of definition.
//!
//! Counters of readings are updated only after a commit, from the commit's own counts, so at
//! every scrape `received = accepted + rejected + duplicates` holds exactly.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sensorlake_readings_received_total` | counter | |
//! | `sensorlake_readings_accepted_total` | counter | |
//! | `sensorlake_readings_rejected_total` | counter | `reason` (class, e.g. `out_of_range`) |
//! | `sensorlake_readings_duplicate_total` | counter | |
//! | `sensorlake_commits_total` | counter | `trigger` |
//! | `sensorlake_commit_errors_total` | counter | |
//! | `sensorlake_commit_storage_full_total` | counter | (failed commits because the lake's file system is full) |
//! | `sensorlake_files_written_total` | counter | `table` |
//! | `sensorlake_bytes_written_total` | counter | `table` |
//! | `sensorlake_messages_in_flight` | gauge | (received, not yet acknowledged) |
//! | `sensorlake_commit_duration_seconds` | histogram | (transform + write + commit) |
//! | `sensorlake_mqtt_messages_total` | counter | (messages received from the broker) |
//! | `sensorlake_mqtt_disconnects_total` | counter | |

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use sensorlake_core::FlushCounts;
use sensorlake_sink::CommitSummary;

/// Serves `/metrics` on `addr`. Must be called inside a tokio runtime.
///
/// # Errors
/// When the address cannot be bound or a recorder is already installed.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}

/// Records one successful commit.
pub fn record_commit(
    counts: &FlushCounts,
    summary: &CommitSummary,
    trigger: &'static str,
    secs: f64,
) {
    metrics::counter!("sensorlake_readings_received_total").increment(counts.received);
    metrics::counter!("sensorlake_readings_accepted_total").increment(counts.accepted);
    metrics::counter!("sensorlake_readings_duplicate_total").increment(counts.duplicates);
    for (reason, n) in &counts.rejected {
        metrics::counter!("sensorlake_readings_rejected_total", "reason" => reason.clone())
            .increment(*n);
    }
    metrics::counter!("sensorlake_commits_total", "trigger" => trigger).increment(1);
    for f in &summary.files {
        let table = f.table.dir();
        metrics::counter!("sensorlake_files_written_total", "table" => table).increment(1);
        metrics::counter!("sensorlake_bytes_written_total", "table" => table).increment(f.bytes);
    }
    metrics::histogram!("sensorlake_commit_duration_seconds").record(secs);
}

/// Sets the in-flight gauge.
pub fn set_in_flight(n: usize) {
    metrics::gauge!("sensorlake_messages_in_flight").set(n as f64);
}

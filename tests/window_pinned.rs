//! The pinned in-flight window, end to end: the embedded rumqttd broker sends at most 100
//! unacknowledged messages per connection (fixed in its router), while the pipeline is told
//! to expect 10,000 per flush. sensorlake must notice, warn once with the fix, adapt its
//! flush cadence, and still lose nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_pinned_in_flight_window_is_detected_warned_about_and_adapted_to() {
    let broker = sensorlake::demo::start_broker().unwrap();
    let url = format!("mqtt://{broker}");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let manifest = dir.path().join("manifest.json");
    let mut p = Pipeline::start(
        &[
            "--mqtt",
            &url,
            "--lake",
            lake.to_str().unwrap(),
            "--protocol",
            "v4",
        ],
        &dir.path().join("pipeline.log"),
        &[
            ("SENSORLAKE_FLUSH__MAX_AGE_MS", "300"),
            ("SENSORLAKE_FLUSH__MAX_MESSAGES", "10000"),
            ("SENSORLAKE_MQTT__CLEAN_START", "true"),
        ],
    );
    let started = Instant::now();
    simulate(&url, 20, 3000, 0.0, 9, &manifest);
    wait_for(
        "every reading to be committed",
        Duration::from_secs(60),
        || committed_readings(&lake) >= 3000,
    );
    let took = started.elapsed();
    assert!(p.terminate().success());
    let log = p.log_text();
    assert!(
        log.contains("The broker stops sending at 100 unacknowledged messages"),
        "the pinned window must be reported with its size:\n{log}"
    );
    assert_eq!(
        log.matches("The broker stops sending").count(),
        1,
        "warned once"
    );
    // Without adapting, 3,000 readings at 100 per 300 ms age flush would take 9 s.
    eprintln!("3,000 readings through a pinned window of 100 took {took:?}");
    let (exact, report) = verify(&lake, &manifest);
    assert!(exact, "{report}");
}

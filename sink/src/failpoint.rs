//! Crash points in the commit protocol, for crash tests of the real binary.
//!
//! Compiled in only with the `failpoints` feature (`scripts/test` turns it on); without it
//! [`hit`] is an empty inline function. With it, `SENSORLAKE_FAILPOINT=<step>` makes the
//! process abort — no destructors, no flushing, as abrupt as SIGKILL — the first time a
//! commit with files reaches `<step>`:
//!
//! - `files_written`: temporary files written, no commit record yet;
//! - `record_written`: commit record written, every file still under its temporary name;
//! - `one_file_visible`: the first file renamed into place, the others not yet;
//! - `files_visible`: every file in place, the temporary folder not yet removed.

/// The named crash points, in protocol order.
pub const STEPS: [&str; 4] = [
    "files_written",
    "record_written",
    "one_file_visible",
    "files_visible",
];

/// Aborts the process if `SENSORLAKE_FAILPOINT` names `step`.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(step: &'static str) {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    debug_assert!(STEPS.contains(&step), "unknown failpoint {step}");
    let armed = ARMED.get_or_init(|| std::env::var("SENSORLAKE_FAILPOINT").ok());
    if armed.as_deref() == Some(step) {
        eprintln!("sensorlake: failpoint {step} reached; aborting as a crash would");
        std::process::abort();
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_step: &'static str) {}

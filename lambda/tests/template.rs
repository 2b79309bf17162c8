//! `deploy/template.yaml` (AWS SAM) passes `cfn-lint` (PyPI `cfn-lint`; `scripts/test`
//! installs it), and keeps the event source mapping settings the function's exactly-once
//! argument depends on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn template() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/template.yaml")
}

#[test]
fn the_sam_template_passes_cfn_lint() {
    let out = Command::new("cfn-lint")
        .arg(template())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "this test needs cfn-lint (`pip install cfn-lint`; scripts/test installs it): {e}"
            )
        });
    assert!(
        out.status.success(),
        "cfn-lint found problems in deploy/template.yaml (exit {:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_event_source_mapping_keeps_what_exactly_once_needs() {
    let text = std::fs::read_to_string(template()).unwrap();
    // Uncommented lines only, without indentation.
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for needed in [
        "ParallelizationFactor: 1",
        "FunctionResponseTypes: [ReportBatchItemFailures]",
        "BisectBatchOnFunctionError: true",
        "Architectures: [arm64]",
        "Runtime: provided.al2023",
        "Input: '{\"action\": \"compact\"}'",
    ] {
        assert!(
            lines.contains(&needed),
            "deploy/template.yaml must keep `{needed}`"
        );
    }
}

//! The one boundary between the async runtime and rayon.
//!
//! Tokio worker threads must never run long CPU work: a transform of 30,000 readings takes
//! tens of milliseconds, during which the MQTT connection and the metrics endpoint sharing that
//! worker would stall. So CPU work over whole batches goes to rayon's pool through [`run`],
//! and the async side awaits a oneshot. Nothing else calls rayon from async code.

use tokio::sync::oneshot;

/// The CPU task panicked; its panic message was printed by the panic hook.
#[derive(Debug, thiserror::Error)]
#[error("a CPU task panicked (this is a bug; please report it with the log above)")]
pub struct CpuTaskPanicked;

/// Runs `f` on the rayon pool and awaits its result without blocking a tokio worker.
///
/// # Errors
/// When `f` panics.
pub async fn run<T, F>(f: F) -> Result<T, CpuTaskPanicked>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.map_err(|_| CpuTaskPanicked)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn returns_the_result_of_the_cpu_work() {
        assert_eq!(super::run(|| (1..=10u64).sum::<u64>()).await.unwrap(), 55);
    }
}

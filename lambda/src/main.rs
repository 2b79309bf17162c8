//! The `sensorlake-lambda` binary: the Lambda runtime around [`Handler`].
//!
//! At cold start it installs the TLS crypto provider, sets up JSON logs (one object per line,
//! as CloudWatch Logs Insights reads them; level from `RUST_LOG`, default `info`), loads the
//! configuration as the service does (`SENSORLAKE_CONFIG`, `SENSORLAKE_<SECTION>__<KEY>`),
//! logs it without secrets, and then serves invocations one at a time. A configuration that
//! cannot work is reported to the Runtime API's `/init/error` and the process exits 1, so the
//! reason shows in the invocation's error instead of a bare `Runtime.ExitError`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use lambda_runtime::{LambdaEvent, service_fn};
use sensorlake_lambda::handler::redact_lake;
use sensorlake_lambda::{Handler, Settings};
use tracing::{error, info};

fn main() -> ExitCode {
    // Two rustls crypto providers are linked (DEPENDENCIES.md): without this, the first TLS
    // handshake (S3) panics.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    init_logging();
    // One thread: the async side only moves bytes (the Runtime API's long poll); transforms
    // run on rayon and lake I/O on blocking threads.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "Cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    // `vars_os`: a variable that is not UTF-8 is skipped, where `vars` would panic.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let (settings, config) = match Settings::load(env) {
        Ok(loaded) => loaded,
        Err(e) => {
            error!(error = %e, "Cannot start: the configuration is invalid");
            report_init_error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };
    info!(
        lake = %redact_lake(&settings.lake),
        lake_options = %json(&config.lake),
        transform = %json(&config.transform),
        registry = ?config.registry.path,
        registry_devices = settings.registry.len(),
        device_types = settings.schema.device_types().len(),
        memory_mb = ?settings.memory_mb,
        "Loaded the configuration; each Kinesis shard is written as lake writer ks-<stream>-<shard>"
    );
    if !settings.lake.to_string_lossy().contains("://")
        && std::env::var_os("AWS_EXECUTION_ENV").is_some()
    {
        tracing::warn!(
            lake = %settings.lake.display(),
            "The lake is a local folder inside the Lambda sandbox, which is discarded; set SENSORLAKE_LAKE__PATH=s3://bucket/prefix"
        );
    }
    let handler = Handler::new(settings);
    let service = service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let handler = handler.clone();
        async move {
            let deadline = deadline_instant(event.context.deadline());
            handler.invoke(event.payload, deadline).await
        }
    });
    match lambda_runtime::run(service).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "The Lambda runtime stopped");
            ExitCode::FAILURE
        }
    }
}

/// The invocation's deadline (wall clock, from the Runtime API) as a monotonic instant.
fn deadline_instant(deadline: SystemTime) -> Instant {
    let left = deadline
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

/// JSON lines on stderr, without colours; `RUST_LOG` sets the level (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

/// Posts `message` to the Runtime API's `/init/error` (best effort: the process exits
/// anyway). Plain HTTP/1.1 over loopback, as the Runtime API is.
fn report_init_error(message: &str) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    let body = serde_json::json!({
        "errorMessage": message,
        "errorType": "sensorlake.InvalidConfiguration",
    })
    .to_string();
    let sent = std::net::TcpStream::connect(&api).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST /2018-06-01/runtime/init/error HTTP/1.1\r\nHost: {api}\r\n\
             Lambda-Runtime-Function-Error-Type: Runtime.InitError\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    });
    if let Err(e) = sent {
        error!(error = %e, api, "Could not report the init error to the Runtime API");
    }
}

/// A configuration section as JSON, for the start-up log line.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("(cannot render: {e})"))
}

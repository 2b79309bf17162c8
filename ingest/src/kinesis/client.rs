//! Building the AWS clients from the standard AWS environment.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;

/// The shared AWS configuration: region, credentials and endpoint overrides
/// (`AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_DYNAMODB`) from the environment and the AWS
/// CLI's profile files.
///
/// The SDK's own retries are off: every caller retries in its own loop with its own backoff,
/// so that throttling is counted, logged and paced where the shard's budget is known.
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await
}

/// [`aws_config`], with the region of `stream` when it is an ARN and no region is configured
/// (`AWS_REGION`, profile): an ARN names its region, so it needs no other setting.
pub async fn aws_config_for_stream(stream: &str) -> aws_config::SdkConfig {
    let config = aws_config().await;
    match (config.region(), super::checkpoint::arn_parts(stream)) {
        (None, Some((region, _))) => config
            .into_builder()
            .region(aws_sdk_kinesis::config::Region::new(region.to_owned()))
            .build(),
        _ => config,
    }
}

/// An error and its sources, on one line (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// A Kinesis client for `config`.
pub fn kinesis(config: &aws_config::SdkConfig) -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(config)
}

/// A short, readable description of an SDK error (of any AWS service: the error types are
/// shared): the service's code and message when there is one, else the transport failure with
/// its cause chain.
pub fn describe<E, R>(e: &aws_sdk_kinesis::error::SdkError<E, R>) -> String
where
    E: std::error::Error + aws_sdk_kinesis::error::ProvideErrorMetadata + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_kinesis::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("service error"),
                err.message().unwrap_or("(no message)")
            )
        }
        other => error_chain(other),
    }
}

//! MQTT source settings: serde types, defaults and validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::tls::TlsConfig;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MqttProtocol {
    /// MQTT 3.1.1. The broker decides the in-flight window (Mosquitto:
    /// `max_inflight_messages`, default 20 — set it to 0 for sensorlake).
    V4,
    /// MQTT 5 (default): sensorlake asks for a large window with Receive Maximum.
    #[default]
    V5,
}

/// `[mqtt]`: where to subscribe and how.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker URL: `mqtt://HOST[:PORT]` (port defaults to 1883), or `mqtts://HOST[:PORT]`
    /// for TLS (port defaults to 8883; set up in `[mqtt.tls]`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Topic filters to subscribe to; `$share/<group>/<filter>` shares one subscription
    /// between several instances.
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// Client id. Must be stable across restarts for the persistent session to work; the
    /// default derives it from the lake writer id (`sensorlake-<writer_id>`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// `v5` (default) or `v4` (MQTT 3.1.1).
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Subscription QoS: 0, 1 (default) or 2. Only 1 and 2 survive a crash without loss.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Start a clean session, discarding what the broker queued for us. Off by default:
    /// the persistent session is what makes a restart lossless.
    #[serde(default)]
    pub clean_start: bool,
    /// MQTT 5 session expiry: how long the broker keeps our session while we are away.
    #[serde(default = "default_session_expiry_secs")]
    pub session_expiry_secs: u32,
    /// MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send us at once.
    /// Acknowledgements wait for the commit, so this window sets the commit cadence.
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Largest MQTT packet buffered whole, in bytes. A PUBLISH over it is still received and
    /// acknowledged, but only its first 4 KiB are kept: the rest is passed over without being
    /// held in memory, and the message becomes a `too_large` dead letter. Messages between
    /// `transform.max_payload_bytes` and this limit are dead-lettered whole. (Sensorlake sends
    /// no MQTT 5 Maximum Packet Size, since brokers drop messages over it silently.)
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// First reconnect delay, in milliseconds.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, in milliseconds.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Username, if the broker requires one. The password never comes from the file: set
    /// `SENSORLAKE_MQTT__PASSWORD` or `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// A file whose contents (trailing newline stripped) are the password.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// The password, from the environment only (never serialized, never logged).
    #[serde(skip)]
    pub password: Option<String>,
    /// Messages buffered between the MQTT connection and the pipeline.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Payload bytes buffered between the MQTT connection and the pipeline (default 64 MiB):
    /// with `channel_capacity`, it bounds the memory that queued messages take, however big
    /// they are. At least `max_packet_bytes`.
    #[serde(default = "default_channel_max_bytes")]
    pub channel_max_bytes: usize,
    /// `[mqtt.tls]`: CA, client certificate and key, server name and ALPN of an `mqtts://`
    /// connection. Optional with `mqtts://` (the system's roots are trusted then); an error
    /// with a plain `mqtt://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &self.url)
            .field("topics", &self.topics)
            .field("client_id", &self.client_id)
            .field("protocol", &self.protocol)
            .field("qos", &self.qos)
            .field("clean_start", &self.clean_start)
            .field("receive_maximum", &self.receive_maximum)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn default_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_topics() -> Vec<String> {
    vec!["telemetry/#".into()]
}
fn default_qos() -> u8 {
    1
}
fn default_session_expiry_secs() -> u32 {
    7 * 24 * 3600
}
fn default_receive_maximum() -> u16 {
    u16::MAX
}
fn default_keep_alive_secs() -> u64 {
    30
}
fn default_max_packet_bytes() -> usize {
    1 << 20
}
fn default_reconnect_min_ms() -> u64 {
    100
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_channel_capacity() -> usize {
    8192
}
fn default_channel_max_bytes() -> usize {
    64 << 20
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml_free_default()
    }
}

fn toml_free_default() -> MqttConfig {
    MqttConfig {
        url: default_url(),
        topics: default_topics(),
        client_id: None,
        protocol: MqttProtocol::default(),
        qos: default_qos(),
        clean_start: false,
        session_expiry_secs: default_session_expiry_secs(),
        receive_maximum: default_receive_maximum(),
        keep_alive_secs: default_keep_alive_secs(),
        max_packet_bytes: default_max_packet_bytes(),
        reconnect_min_ms: default_reconnect_min_ms(),
        reconnect_max_ms: default_reconnect_max_ms(),
        username: None,
        password_file: None,
        password: None,
        channel_capacity: default_channel_capacity(),
        channel_max_bytes: default_channel_max_bytes(),
        tls: None,
    }
}

/// A broker's host and port, parsed from `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the connection is TLS (`mqtts://`).
    pub tls: bool,
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The URL is not `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
    #[error(
        "mqtt.url `{url}` is not valid: {why} (expected mqtt://HOST:PORT, e.g. mqtt://127.0.0.1:1883, or mqtts://HOST:PORT for TLS)"
    )]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No topic filter, or an empty / malformed one.
    #[error("mqtt.topics: {0}")]
    BadTopic(String),
    /// QoS outside 0..=2.
    #[error("mqtt.qos must be 0, 1 or 2, not {0}")]
    BadQos(u8),
    /// A size or window that cannot work.
    #[error("mqtt.{field}: {why}")]
    BadValue {
        /// The key.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// A `[mqtt.tls]` setting that cannot work: a file that is missing, unreadable or not
    /// PEM, a key that does not belong to its certificate, a bad name, or TLS settings with a
    /// plain URL. The message names the key, the path and what to do; never a key's contents.
    #[error("mqtt.tls.{key}: {why}")]
    Tls {
        /// The key under `[mqtt.tls]`.
        key: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// `[mqtt.tls]` with a plain `mqtt://` URL: TLS settings that would be ignored.
    #[error(
        "[mqtt.tls] is set but mqtt.url `{url}` is a plain connection; use mqtts://HOST:PORT \
         (port 8883 by default) for TLS, or remove [mqtt.tls]"
    )]
    TlsWithPlainUrl {
        /// The URL as given.
        url: String,
    },
}

/// Parses `mqtt://HOST[:PORT]` (also `tcp://`; port 1883 by default) and, for TLS,
/// `mqtts://HOST[:PORT]` (also `ssl://`; port 8883 by default). Whether the address is TLS is
/// in [`BrokerAddr::tls`]; the TLS settings themselves are `[mqtt.tls]` ([`TlsConfig`]).
///
/// # Errors
/// On another scheme, a missing host or a bad port.
pub fn parse_url(url: &str) -> Result<BrokerAddr, ConfigError> {
    let bad = |why| ConfigError::BadUrl {
        url: url.to_owned(),
        why,
    };
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (r, false)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("ssl://") {
        (r, true)
    } else {
        return Err(bad("the scheme must be mqtt:// (or mqtts:// for TLS)"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') {
        return Err(bad(
            "put credentials in mqtt.username / SENSORLAKE_MQTT__PASSWORD, and no path",
        ));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if port == 0 {
        return Err(bad("the port is not a number from 1 to 65535"));
    }
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
        tls,
    })
}

impl MqttConfig {
    /// Checks every setting and returns the broker address. With TLS this reads and parses
    /// the CA, certificate and key files (or loads the system's root certificates), so that a
    /// bad file stops the start, not every connection attempt.
    ///
    /// # Errors
    /// The first setting that cannot work, naming its key.
    pub fn validate(&self) -> Result<BrokerAddr, ConfigError> {
        self.prepare().map(|(addr, _)| addr)
    }

    /// [`validate`](Self::validate), keeping the TLS connector it builds.
    pub(crate) fn prepare(
        &self,
    ) -> Result<(BrokerAddr, Option<super::tls::Connector>), ConfigError> {
        let addr = parse_url(&self.url)?;
        if self.topics.is_empty() {
            return Err(ConfigError::BadTopic(
                "at least one topic filter is needed, e.g. telemetry/#".into(),
            ));
        }
        for t in &self.topics {
            validate_filter(t)?;
        }
        if self.qos > 2 {
            return Err(ConfigError::BadQos(self.qos));
        }
        if self.receive_maximum == 0 {
            return Err(ConfigError::BadValue {
                field: "receive_maximum",
                why: "must be at least 1".into(),
            });
        }
        if self.max_packet_bytes < 1024 {
            return Err(ConfigError::BadValue {
                field: "max_packet_bytes",
                why: format!("{} is too small; use at least 1024", self.max_packet_bytes),
            });
        }
        if self.channel_max_bytes < self.max_packet_bytes {
            return Err(ConfigError::BadValue {
                field: "channel_max_bytes",
                why: format!(
                    "{} is less than mqtt.max_packet_bytes ({}); raise it or lower max_packet_bytes",
                    self.channel_max_bytes, self.max_packet_bytes
                ),
            });
        }
        if self.channel_capacity == 0 {
            return Err(ConfigError::BadValue {
                field: "channel_capacity",
                why: "must be at least 1".into(),
            });
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 128)
        {
            return Err(ConfigError::BadValue {
                field: "client_id",
                why: "must be 1-128 characters".into(),
            });
        }
        let tls = match (&self.tls, addr.tls) {
            (Some(tls), true) => Some(super::tls::Connector::try_new(tls, &addr)?),
            (None, true) => Some(super::tls::Connector::try_new(
                &TlsConfig::default(),
                &addr,
            )?),
            (Some(_), false) => {
                return Err(ConfigError::TlsWithPlainUrl {
                    url: self.url.clone(),
                });
            }
            (None, false) => None,
        };
        Ok((addr, tls))
    }

    /// The reconnect backoff bounds.
    pub fn reconnect_bounds(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.reconnect_min_ms.max(1)),
            Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_min_ms).max(1)),
        )
    }
}

/// Checks an MQTT topic filter, including shared subscriptions (`$share/group/filter`).
fn validate_filter(f: &str) -> Result<(), ConfigError> {
    let err = |why: &str| ConfigError::BadTopic(format!("`{f}` {why}"));
    let inner = if let Some(rest) = f.strip_prefix("$share/") {
        let (group, filter) = rest
            .split_once('/')
            .ok_or_else(|| err("must be $share/<group>/<filter>"))?;
        if group.is_empty() || group.contains(['+', '#']) {
            return Err(err("has an empty or wildcard share group"));
        }
        filter
    } else {
        f
    };
    if inner.is_empty() {
        return Err(err("is empty"));
    }
    let levels: Vec<&str> = inner.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(err("uses # other than as the whole last level"));
        }
        if l.contains('+') && *l != "+" {
            return Err(err("uses + other than as a whole level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            BrokerAddr {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false,
            }
        );
        assert_eq!(parse_url("mqtt://broker").unwrap().port, 1883);
        assert_eq!(parse_url("mqtt://[::1]:1885").unwrap().host, "::1");
        assert!(parse_url("http://x").is_err());
        assert_eq!(
            parse_url("mqtts://x:8884").unwrap(),
            BrokerAddr {
                host: "x".into(),
                port: 8884,
                tls: true,
            }
        );
        let tls = parse_url("ssl://broker.example").unwrap();
        assert_eq!((tls.port, tls.tls), (8883, true));
        assert_eq!(tls.to_string(), "mqtts://broker.example:8883");
        assert_eq!(
            parse_url("mqtt://[::1]:1885").unwrap().to_string(),
            "mqtt://[::1]:1885"
        );
        assert!(parse_url("mqtt://:1883").is_err());
        assert!(parse_url("mqtt://h:99999").is_err());
        assert!(parse_url("mqtt://user:pw@h:1").is_err());
    }

    #[test]
    fn accepts_shared_subscriptions_and_rejects_bad_wildcards() {
        assert!(validate_filter("$share/lake/telemetry/#").is_ok());
        assert!(validate_filter("telemetry/+/env/#").is_ok());
        assert!(validate_filter("telemetry/#/x").is_err());
        assert!(validate_filter("tele+metry").is_err());
        assert!(validate_filter("$share//x").is_err());
        assert!(validate_filter("$share/g").is_err());
    }

    #[test]
    fn tls_settings_with_a_plain_url_are_an_error() {
        let c = MqttConfig {
            url: "mqtt://broker:8883".into(),
            tls: Some(TlsConfig::default()),
            ..MqttConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("[mqtt.tls] is set but mqtt.url"), "{e}");
        assert!(e.contains("use mqtts://"), "{e}");
    }

    #[test]
    fn tls_file_errors_surface_from_validate() {
        let c = MqttConfig {
            url: "mqtts://broker".into(),
            tls: Some(TlsConfig {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..TlsConfig::default()
            }),
            ..MqttConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("mqtt.tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_redacts_the_password() {
        let c = MqttConfig {
            password: Some("hunter2".into()),
            ..MqttConfig::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"));
        assert!(s.contains("[REDACTED]"));
    }
}

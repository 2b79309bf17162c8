//! TLS for the MQTT source: the `[mqtt.tls]` settings, the rustls client configuration built
//! from them at start-up, the connection (plain TCP, or rustls over TCP), and the translation of
//! what rustls reports into errors that say what to do.
//!
//! Design:
//! - Everything that can be checked without the broker is checked once, at start-up
//!   ([`Connector::try_new`], called by `MqttConfig::validate`): files are read and parsed, the
//!   client key is matched against its certificate, names and ALPN protocols are checked. A
//!   bad file stops the start with the key and the path; it never becomes a retry loop.
//! - Trust: the CA certificates of `ca_file`, or else the system's root certificates
//!   (`rustls-native-certs`, which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`). The broker's
//!   certificate is always verified, for `server_name` (default: the URL's host; an IP
//!   address is matched against the certificate's IP addresses). There is no switch to turn
//!   verification off.
//! - One crypto provider, aws-lc-rs, named here rather than taken from the process default:
//!   several providers are linked into the binaries, and rustls refuses to guess.
//! - Secrets: the client key is read into [`ClientKey`], whose `Debug` prints `[REDACTED]`,
//!   and handed to rustls; no error, log line or `Debug` output carries its bytes. The
//!   settings' `Debug` shows paths only.
//! - Errors: rustls reports certificate problems and the broker's alerts as typed errors
//!   inside `std::io::Error`. [`Stream`] replaces them, during the handshake and on every read
//!   and write after it (with TLS 1.3 a broker rejects a client certificate only after the
//!   client's handshake is done, so the alert arrives on the first read), by one sentence that
//!   names the cause and the setting to change.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::config::{BrokerAddr, ConfigError};

/// `[mqtt.tls]`: how an `mqtts://` connection is secured. Every key is optional.
///
/// `Debug` shows paths and names only, never the contents of the files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that may sign the broker's certificate (a bundle
    /// may hold several). Unset: the system's root certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM file with this client's certificate (then any intermediates), for brokers that
    /// require one (mutual TLS; AWS IoT Core on port 8883). Needs `client_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM file with the private key of `client_cert_file`: PKCS#8 (`BEGIN PRIVATE KEY`),
    /// PKCS#1 RSA (`BEGIN RSA PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`), unencrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// The name sent as SNI and verified in the broker's certificate. Unset: the host of
    /// `mqtt.url`. An IP address is verified against the certificate's IP addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// ALPN protocol names to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    /// Unset: no ALPN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
}

/// A client private key. Its `Debug` never shows the key.
struct ClientKey(PrivateKeyDer<'static>);

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// A validated `[mqtt.tls]`: the rustls client configuration, the name to verify, and what the
/// error messages refer to.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    explain: Arc<Explain>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .field("trust", &self.explain.trust)
            .field("client_certificate", &self.explain.client_cert)
            .field("alpn", &self.config.alpn_protocols.len())
            .finish_non_exhaustive()
    }
}

/// Where a setting's error points.
fn bad(key: &'static str, why: String) -> ConfigError {
    ConfigError::Tls { key, why }
}

impl Connector {
    /// Reads and checks everything `tls` names, for a connection to `addr`.
    ///
    /// # Errors
    /// A file that is missing, unreadable, empty or not PEM; a certificate without its key or
    /// the reverse; a key that does not belong to the certificate; no usable root
    /// certificate; a server name or ALPN protocol that cannot be sent.
    pub(crate) fn try_new(tls: &TlsConfig, addr: &BrokerAddr) -> Result<Connector, ConfigError> {
        let (roots, trust) = match &tls.ca_file {
            Some(path) => (
                load_ca_file(path)?,
                format!("the CA certificates in {}", path.display()),
            ),
            None => (
                load_system_roots()?,
                "the system's root certificates".to_owned(),
            ),
        };
        Self::with_roots(tls, addr, roots, trust)
    }

    /// [`try_new`](Self::try_new) with the trusted roots already loaded.
    fn with_roots(
        tls: &TlsConfig,
        addr: &BrokerAddr,
        roots: RootCertStore,
        trust: String,
    ) -> Result<Connector, ConfigError> {
        let (name, name_key) = match &tls.server_name {
            Some(n) => (n.clone(), "mqtt.tls.server_name"),
            None => (addr.host.clone(), "the host of mqtt.url"),
        };
        let server_name = ServerName::try_from(name.clone()).map_err(|_| {
            bad(
                "server_name",
                format!(
                    "`{name}` ({name_key}) is neither a DNS name nor an IP address; set \
                     mqtt.tls.server_name to the name in the broker's certificate"
                ),
            )
        })?;
        let mut alpn = Vec::with_capacity(tls.alpn.len());
        for p in &tls.alpn {
            if p.is_empty() || p.len() > 255 {
                return Err(bad(
                    "alpn",
                    format!(
                        "`{p}` is not a protocol name: each must be 1-255 bytes, e.g. \
                         \"x-amzn-mqtt-ca\" for AWS IoT Core on port 443"
                    ),
                ));
            }
            alpn.push(p.as_bytes().to_vec());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports the safe default protocol versions (TLS 1.2 and 1.3)")
            .with_root_certificates(roots);
        let mut config = match (&tls.client_cert_file, &tls.client_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_path), Some(key_path)) => {
                let chain = load_certs("client_cert_file", cert_path)?;
                let key = load_key(key_path)?;
                builder
                    .with_client_auth_cert(chain, key.0)
                    .map_err(|e| client_auth_error(&e, cert_path, key_path))?
            }
            (Some(cert_path), None) => {
                return Err(bad(
                    "client_key_file",
                    format!(
                        "is not set, but client_cert_file is ({}); set it to the PEM file of \
                         that certificate's private key",
                        cert_path.display()
                    ),
                ));
            }
            (None, Some(key_path)) => {
                return Err(bad(
                    "client_cert_file",
                    format!(
                        "is not set, but client_key_file is ({}); set it to the PEM file of the \
                         certificate that key belongs to",
                        key_path.display()
                    ),
                ));
            }
        };
        config.alpn_protocols = alpn;
        Ok(Connector {
            config: Arc::new(config),
            server_name,
            explain: Arc::new(Explain {
                broker: addr.to_string(),
                name,
                name_key,
                trust,
                client_cert: tls.client_cert_file.is_some(),
            }),
        })
    }
}

/// Reads a PEM file named by `key`; errors name the key and the path.
fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| {
        bad(
            key,
            format!(
                "cannot read {}: {e}; check the path, and that sensorlake's user may read the file",
                path.display()
            ),
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(
            key,
            format!("{} is empty; it must hold PEM data", path.display()),
        ));
    }
    Ok(bytes)
}

/// What is wrong with PEM data, without quoting any of it (a key file's lines are secret).
fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".into(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".into(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".into(),
        pem::Error::SectionTooLarge => "a PEM section is too large".into(),
        pem::Error::Io(e) => format!("it cannot be read ({e})"),
        _ => "it is not valid PEM".into(),
    }
}

/// The certificates of a PEM file (at least one).
fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            bad(
                key,
                format!(
                    "{} is not a PEM certificate file: {}",
                    path.display(),
                    pem_problem(&e)
                ),
            )
        })?;
    if certs.is_empty() {
        return Err(bad(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----); a DER file converts \
                 with `openssl x509 -inform der -in FILE -out FILE.pem`",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The trusted roots of `ca_file`.
fn load_ca_file(path: &Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in load_certs("ca_file", path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            bad(
                "ca_file",
                format!(
                    "certificate {} in {} cannot be used as a CA certificate: {e}",
                    i + 1,
                    path.display()
                ),
            )
        })?;
    }
    Ok(roots)
}

/// The system's root certificates; an error when none load.
fn load_system_roots() -> Result<RootCertStore, ConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(bad(
            "ca_file",
            format!(
                "is not set, and no system root certificate could be loaded{why}; set \
                 mqtt.tls.ca_file to the PEM file of the CA that signed the broker's \
                 certificate, or install the system's CA bundle (Debian: ca-certificates)"
            ),
        ));
    }
    if let Some(e) = found.errors.first() {
        tracing::debug!(error = %e, loaded = added, "Some system root certificates could not be loaded");
    }
    Ok(roots)
}

/// The private key of a PEM file. Errors never quote the file.
fn load_key(path: &Path) -> Result<ClientKey, ConfigError> {
    let pem = read_pem("client_key_file", path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => Ok(ClientKey(k)),
        Err(pem::Error::NoItemsFound) => {
            let encrypted = pem.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED");
            Err(bad(
                "client_key_file",
                if encrypted {
                    format!(
                        "the key in {} is encrypted, which sensorlake cannot read; decrypt it \
                         with `openssl pkey -in KEY -out KEY.plain` and keep that file readable \
                         by sensorlake's user only",
                        path.display()
                    )
                } else {
                    format!(
                        "{} holds no private key (PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE \
                         KEY` or `BEGIN EC PRIVATE KEY`)",
                        path.display()
                    )
                },
            ))
        }
        Err(e) => Err(bad(
            "client_key_file",
            format!(
                "{} is not a PEM key file: {}",
                path.display(),
                pem_problem(&e)
            ),
        )),
    }
}

/// Why rustls refused the client certificate and key.
fn client_auth_error(e: &rustls::Error, cert: &Path, key: &Path) -> ConfigError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => bad(
            "client_key_file",
            format!(
                "the key in {} does not belong to the certificate in {} \
                 (mqtt.tls.client_cert_file); give the key the certificate was issued for",
                key.display(),
                cert.display()
            ),
        ),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => bad(
            "client_cert_file",
            format!(
                "the certificate in {} cannot be used: {e}; it must be a PEM X.509 certificate",
                cert.display()
            ),
        ),
        _ => bad(
            "client_key_file",
            format!(
                "the key in {} cannot be used ({e}); use an RSA, ECDSA (P-256, P-384, P-521) or \
                 Ed25519 key",
                key.display()
            ),
        ),
    }
}

/// A connection to the broker: plain TCP, or TLS over TCP.
pub(crate) enum Stream {
    /// `mqtt://`.
    Plain(TcpStream),
    /// `mqtts://`, with what its error messages refer to.
    Tls(Box<TlsStream<TcpStream>>, Arc<Explain>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(_) => f.write_str("Stream::Plain"),
            Stream::Tls(..) => f.write_str("Stream::Tls"),
        }
    }
}

/// Opens a TCP connection to `addr` and, with `tls`, completes the TLS handshake on it.
///
/// # Errors
/// The TCP connection fails, or the handshake does (with a message that says what to do).
pub(crate) async fn connect(addr: &BrokerAddr, tls: Option<&Connector>) -> io::Result<Stream> {
    let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
        .await
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot reach the broker: {e}; is it running and reachable at this address?"
                ),
            )
        })?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match connector.connect(tls.server_name.clone(), tcp).await {
        Ok(s) => Ok(Stream::Tls(Box::new(s), tls.explain.clone())),
        Err(e) => Err(tls.explain.explain(e, true)),
    }
}

/// The hint added to failures of a plain connection once TCP is up: the most common cause of a
/// broker that answers CONNECT with garbage or by hanging up is a TLS listener.
pub(crate) fn plain_hint(addr: &BrokerAddr, why: &str) -> String {
    format!(
        "{why}; if {}:{} is a TLS listener, use mqtts://",
        addr.host, addr.port
    )
}

/// What TLS error messages refer to: the broker, the name verified, what is trusted and
/// whether a client certificate is configured.
#[derive(Debug)]
pub(crate) struct Explain {
    broker: String,
    name: String,
    /// Where `name` comes from: `mqtt.tls.server_name` or the URL's host.
    name_key: &'static str,
    trust: String,
    client_cert: bool,
}

impl Explain {
    /// `e` with a rustls error (or a handshake cut short) replaced by what it means and what
    /// to do; other errors unchanged.
    fn explain(&self, e: io::Error, handshake: bool) -> io::Error {
        let kind = e.kind();
        let msg = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => self.rustls(r),
            None if handshake
                && matches!(
                    kind,
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                format!(
                    "the server at {} closed the connection during the TLS handshake ({e}); is \
                     it a TLS listener? mqtts:// needs one, use mqtt:// for a plain listener",
                    self.broker
                )
            }
            None => return e,
        };
        io::Error::new(kind, msg)
    }

    /// One sentence for a rustls error: the cause, and the setting to change.
    fn rustls(&self, e: &rustls::Error) -> String {
        use AlertDescription as A;
        use CertificateError as C;
        match e {
            rustls::Error::InvalidCertificate(C::NotValidForName) => format!(
                "the broker's certificate is not valid for the name `{}` ({}) ({e}); set \
                 mqtt.tls.server_name to a name the certificate has",
                self.name, self.name_key
            ),
            rustls::Error::InvalidCertificate(C::NotValidForNameContext { presented, .. }) => {
                let names: Vec<String> = presented.iter().map(|n| general_name(n)).collect();
                let has = if names.is_empty() {
                    "it names no host".to_owned()
                } else {
                    format!("it is valid for {}", names.join(", "))
                };
                format!(
                    "the broker's certificate is not valid for the name `{}` ({}): {has}; set \
                     mqtt.tls.server_name to a name the certificate has",
                    self.name, self.name_key
                )
            }
            rustls::Error::InvalidCertificate(C::UnknownIssuer) => format!(
                "the broker's certificate is signed by an unknown issuer: it does not chain to \
                 {}; set mqtt.tls.ca_file to the PEM file of the CA that signed it",
                self.trust
            ),
            rustls::Error::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            ) => format!(
                "the broker's certificate is outside its validity period ({e}); renew it on \
                 the broker, or check this machine's clock"
            ),
            rustls::Error::InvalidCertificate(_) => format!(
                "the broker's certificate was rejected ({e}); check the certificate chain the \
                 broker sends and mqtt.tls.ca_file"
            ),
            rustls::Error::AlertReceived(A::CertificateRequired) => format!(
                "the broker requires a client certificate ({e}); set mqtt.tls.client_cert_file \
                 and mqtt.tls.client_key_file"
            ),
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied,
            ) => {
                if self.client_cert {
                    format!(
                        "the broker rejected our client certificate ({e}); check that \
                         mqtt.tls.client_cert_file is signed by a CA the broker trusts, is \
                         valid now, and matches mqtt.tls.client_key_file"
                    )
                } else {
                    format!(
                        "the broker rejected the connection ({e}); it probably requires a client \
                         certificate: set mqtt.tls.client_cert_file and mqtt.tls.client_key_file"
                    )
                }
            }
            rustls::Error::AlertReceived(A::HandshakeFailure) => format!(
                "the broker refused the TLS handshake ({e}); it may require a client \
                 certificate (mqtt.tls.client_cert_file and client_key_file) or share no TLS \
                 version or cipher suite with sensorlake (TLS 1.2 and 1.3)"
            ),
            rustls::Error::AlertReceived(A::NoApplicationProtocol)
            | rustls::Error::NoApplicationProtocol => format!(
                "the broker accepts none of the ALPN protocols offered ({e}); check mqtt.tls.alpn \
                 (AWS IoT Core on port 443 wants [\"x-amzn-mqtt-ca\"])"
            ),
            rustls::Error::AlertReceived(A::ProtocolVersion) => format!(
                "the broker speaks no TLS version sensorlake accepts ({e}); sensorlake needs TLS \
                 1.2 or 1.3"
            ),
            rustls::Error::AlertReceived(A::UnrecognisedName) => format!(
                "the broker does not serve the name `{}` ({}) sent as SNI ({e}); set \
                 mqtt.tls.server_name to a name it serves",
                self.name, self.name_key
            ),
            rustls::Error::AlertReceived(_) => {
                format!("the broker ended the TLS session ({e}); its log says why")
            }
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => format!(
                "the server at {} does not speak TLS ({e}); is it a TLS listener? mqtts:// needs \
                 one, use mqtt:// for a plain listener",
                self.broker
            ),
            other => format!("TLS with the broker at {} failed: {other}", self.broker),
        }
    }
}

/// `DnsName("localhost")` → `localhost`, `IpAddress(127.0.0.1)` → `127.0.0.1` (how webpki
/// lists a certificate's names).
fn general_name(n: &str) -> String {
    n.strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            n.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        })
        .unwrap_or(n)
        .to_owned()
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s, x) => match Pin::new(&mut **s).poll_read(cx, buf) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(x.explain(e, false))),
                other => other,
            },
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s, x) => match Pin::new(&mut **s).poll_write(cx, buf) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(x.explain(e, false))),
                other => other,
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s, x) => match Pin::new(&mut **s).poll_flush(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(x.explain(e, false))),
                other => other,
            },
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str) -> BrokerAddr {
        BrokerAddr {
            host: host.into(),
            port: 8883,
            tls: true,
        }
    }

    fn connector(tls: &TlsConfig, host: &str) -> Connector {
        Connector::with_roots(
            tls,
            &addr(host),
            RootCertStore::empty(),
            "test roots".into(),
        )
        .unwrap()
    }

    fn err(r: Result<Connector, ConfigError>) -> String {
        r.unwrap_err().to_string()
    }

    /// Writes `contents` to a new file in `dir`.
    fn file(dir: &tempfile::TempDir, name: &str, contents: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    #[test]
    fn a_client_key_debugs_as_redacted() {
        let key = ClientKey(PrivateKeyDer::Pkcs8(vec![0x30, 0x42, 0x13, 0x37].into()));
        assert_eq!(format!("{key:?}"), "[REDACTED]");
    }

    #[test]
    fn a_missing_or_empty_or_non_pem_ca_file_names_the_key_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let tls = TlsConfig {
            ca_file: Some(missing.clone()),
            ..TlsConfig::default()
        };
        let e = err(Connector::try_new(&tls, &addr("localhost")));
        assert!(e.starts_with("mqtt.tls.ca_file: cannot read"), "{e}");
        assert!(e.contains(&missing.display().to_string()), "{e}");

        let empty = file(&dir, "empty.pem", "\n");
        let tls = TlsConfig {
            ca_file: Some(empty),
            ..TlsConfig::default()
        };
        let e = err(Connector::try_new(&tls, &addr("localhost")));
        assert!(e.contains("empty.pem is empty"), "{e}");

        let der = file(&dir, "ca.der", "0\u{1}binary-ish, not PEM");
        let tls = TlsConfig {
            ca_file: Some(der),
            ..TlsConfig::default()
        };
        let e = err(Connector::try_new(&tls, &addr("localhost")));
        assert!(e.contains("ca.der holds no PEM certificate"), "{e}");
        assert!(e.contains("openssl x509 -inform der"), "{e}");

        let broken = file(&dir, "broken.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let tls = TlsConfig {
            ca_file: Some(broken),
            ..TlsConfig::default()
        };
        let e = err(Connector::try_new(&tls, &addr("localhost")));
        assert!(
            e.contains("broken.pem is not a PEM certificate file"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key_and_the_reverse() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir, "x.pem", "whatever");
        let only_cert = TlsConfig {
            client_cert_file: Some(p.clone()),
            ..TlsConfig::default()
        };
        let e = err(Connector::with_roots(
            &only_cert,
            &addr("h"),
            RootCertStore::empty(),
            String::new(),
        ));
        assert!(e.starts_with("mqtt.tls.client_key_file: is not set"), "{e}");
        let only_key = TlsConfig {
            client_key_file: Some(p),
            ..TlsConfig::default()
        };
        let e = err(Connector::with_roots(
            &only_key,
            &addr("h"),
            RootCertStore::empty(),
            String::new(),
        ));
        assert!(
            e.starts_with("mqtt.tls.client_cert_file: is not set"),
            "{e}"
        );
    }

    #[test]
    fn key_file_errors_say_what_is_wrong_without_quoting_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA";
        for (name, contents, expected) in [
            (
                "garbage.pem",
                format!("-----BEGIN PRIVATE KEY-----\n{secret}!!\n-----END PRIVATE KEY-----\n"),
                "not a PEM key file: a PEM section is not valid base64",
            ),
            (
                "cert-only.pem",
                format!("-----BEGIN CERTIFICATE-----\n{secret}==\n-----END CERTIFICATE-----\n"),
                "holds no private key",
            ),
            (
                "encrypted.pem",
                format!(
                    "-----BEGIN ENCRYPTED PRIVATE KEY-----\n{secret}==\n-----END ENCRYPTED PRIVATE KEY-----\n"
                ),
                "is encrypted",
            ),
            (
                "unterminated.pem",
                format!("-----BEGIN PRIVATE KEY-----\n{secret}\n"),
                "a PEM section has no END line",
            ),
        ] {
            let path = file(&dir, name, &contents);
            let e = load_key(&path).unwrap_err().to_string();
            assert!(e.starts_with("mqtt.tls.client_key_file: "), "{e}");
            assert!(e.contains(name), "{e}");
            assert!(e.contains(expected), "{name}: {e}");
            assert!(!e.contains(secret), "the key's contents leaked: {e}");
        }
    }

    #[test]
    fn server_names_and_alpn_protocols_are_checked() {
        let e = err(Connector::with_roots(
            &TlsConfig {
                server_name: Some("not a name!".into()),
                ..TlsConfig::default()
            },
            &addr("h"),
            RootCertStore::empty(),
            String::new(),
        ));
        assert!(e.starts_with("mqtt.tls.server_name: `not a name!`"), "{e}");
        let e = err(Connector::with_roots(
            &TlsConfig {
                alpn: vec![String::new()],
                ..TlsConfig::default()
            },
            &addr("h"),
            RootCertStore::empty(),
            String::new(),
        ));
        assert!(e.starts_with("mqtt.tls.alpn: ``"), "{e}");
    }

    #[test]
    fn the_name_defaults_to_the_urls_host_and_alpn_goes_into_the_rustls_config() {
        let c = connector(&TlsConfig::default(), "broker.example");
        assert_eq!(
            c.server_name,
            ServerName::try_from("broker.example").unwrap()
        );
        assert!(c.config.alpn_protocols.is_empty());
        assert!(c.config.enable_sni);

        let c = connector(
            &TlsConfig {
                server_name: Some("xxxx-ats.iot.eu-west-1.amazonaws.com".into()),
                alpn: vec!["x-amzn-mqtt-ca".into()],
                ..TlsConfig::default()
            },
            "10.0.0.7",
        );
        assert_eq!(
            c.server_name,
            ServerName::try_from("xxxx-ats.iot.eu-west-1.amazonaws.com").unwrap()
        );
        assert_eq!(c.config.alpn_protocols, [b"x-amzn-mqtt-ca".to_vec()]);

        let c = connector(&TlsConfig::default(), "127.0.0.1");
        assert!(matches!(c.server_name, ServerName::IpAddress(_)));
    }

    /// Accepts one connection on a loopback port, reads its ClientHello and hangs up; returns
    /// the SNI name and the ALPN protocols offered, and what the client saw.
    async fn client_hello(
        tls: &TlsConfig,
        host: &str,
    ) -> (Option<String>, Vec<Vec<u8>>, io::Error) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // The connector verifies `host`; the TCP connection goes to the loopback listener.
        let c = connector(tls, host);
        let target = BrokerAddr {
            host: "127.0.0.1".into(),
            port,
            tls: true,
        };
        let client = tokio::spawn(async move { connect(&target, Some(&c)).await.map(|_| ()) });
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut acceptor = rustls::server::Acceptor::default();
        let mut buf = vec![0u8; 16 * 1024];
        let (sni, alpn) = loop {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client hung up before its ClientHello");
            acceptor.read_tls(&mut &buf[..n]).unwrap();
            if let Some(accepted) = acceptor.accept().map_err(|(e, _)| e).unwrap() {
                let hello = accepted.client_hello();
                let sni = hello.server_name().map(str::to_owned);
                let alpn = hello
                    .alpn()
                    .map(|ps| ps.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default();
                break (sni, alpn);
            }
        };
        drop(sock);
        let seen = client.await.unwrap().unwrap_err();
        (sni, alpn, seen)
    }

    #[tokio::test]
    async fn sends_the_server_name_as_sni_and_the_alpn_protocols() {
        let tls = TlsConfig {
            server_name: Some("broker.example".into()),
            alpn: vec!["x-amzn-mqtt-ca".into(), "mqtt".into()],
            ..TlsConfig::default()
        };
        let (sni, alpn, seen) = client_hello(&tls, "127.0.0.1").await;
        assert_eq!(sni.as_deref(), Some("broker.example"));
        assert_eq!(alpn, [b"x-amzn-mqtt-ca".to_vec(), b"mqtt".to_vec()]);
        let seen = seen.to_string();
        assert!(
            seen.contains("closed the connection during the TLS handshake")
                && seen.contains("is it a TLS listener?"),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn an_ip_address_host_sends_no_sni_and_no_alpn_unless_asked() {
        let (sni, alpn, _) = client_hello(&TlsConfig::default(), "127.0.0.1").await;
        assert_eq!(sni, None, "SNI carries DNS names only");
        assert!(alpn.is_empty());
        let (sni, _, _) = client_hello(&TlsConfig::default(), "localhost").await;
        assert_eq!(sni.as_deref(), Some("localhost"));
    }

    fn explain(client_cert: bool, name_from_config: bool) -> Explain {
        Explain {
            broker: "mqtts://localhost:8883".into(),
            name: "wrong.example".into(),
            name_key: if name_from_config {
                "mqtt.tls.server_name"
            } else {
                "the host of mqtt.url"
            },
            trust: "the system's root certificates".into(),
            client_cert,
        }
    }

    fn explained(x: &Explain, e: rustls::Error, handshake: bool) -> String {
        x.explain(io::Error::new(io::ErrorKind::InvalidData, e), handshake)
            .to_string()
    }

    #[test]
    fn explains_what_rustls_reports_and_names_the_setting_to_change() {
        let x = explain(false, true);
        let e = explained(
            &x,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("wrong.example").unwrap(),
                presented: vec![
                    "DnsName(\"localhost\")".into(),
                    "IpAddress(127.0.0.1)".into(),
                ],
            }),
            true,
        );
        assert_eq!(
            e,
            "the broker's certificate is not valid for the name `wrong.example` \
             (mqtt.tls.server_name): it is valid for localhost, 127.0.0.1; set \
             mqtt.tls.server_name to a name the certificate has"
        );
        let e = explained(
            &x,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            true,
        );
        assert!(e.contains("unknown issuer"), "{e}");
        assert!(e.contains("the system's root certificates"), "{e}");
        assert!(e.contains("set mqtt.tls.ca_file"), "{e}");
        let e = explained(
            &x,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            false,
        );
        assert!(
            e.starts_with("the broker requires a client certificate"),
            "{e}"
        );
        assert!(e.contains("mqtt.tls.client_cert_file"), "{e}");
        let e = explained(
            &x,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            false,
        );
        assert!(e.contains("probably requires a client certificate"), "{e}");
        let with_cert = explain(true, false);
        let e = explained(
            &with_cert,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            false,
        );
        assert!(
            e.starts_with("the broker rejected our client certificate"),
            "{e}"
        );
        assert!(e.contains("UnknownCA"), "{e}");
        let e = explained(
            &x,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            true,
        );
        assert!(e.contains("does not speak TLS"), "{e}");
        assert!(e.contains("use mqtt:// for a plain listener"), "{e}");

        // Not rustls's, not in the handshake: unchanged.
        let other = x
            .explain(io::Error::new(io::ErrorKind::UnexpectedEof, "eof"), false)
            .to_string();
        assert_eq!(other, "eof");
    }

    #[test]
    fn debug_output_shows_paths_and_names_only() {
        let tls = TlsConfig {
            client_key_file: Some("/run/secrets/key.pem".into()),
            ..TlsConfig::default()
        };
        let s = format!("{tls:?}");
        assert!(s.contains("/run/secrets/key.pem"), "{s}");
        let c = connector(&TlsConfig::default(), "localhost");
        let s = format!("{c:?}");
        assert!(s.contains("localhost") && s.contains("test roots"), "{s}");
    }
}

//! QUIC transport (quinn + rustls, TLS 1.3): the site's certificate, the endpoint tuning for bulk
//! transfer, the receiver's certificate check (a pinned SHA-256 fingerprint, or CA roots), and
//! the frame halves a [`Link`] runs over one bidirectional stream.
//!
//! On first start a site without a configured certificate generates a self-signed one (rcgen)
//! and keeps it beside its key file; its fingerprint is published in `/db-sync/api/status` and
//! sent at registration, and receivers pin it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dbsync_protocol::codec::Limits;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::link::{FrameReader, FrameWriter, Link, LinkFailure, read_framed};

/// ALPN protocol id of a dbsync session.
pub const ALPN: &[u8] = b"dbsync/1";

/// QUIC settings (`[quic]` in `dbsync.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// Serve sessions over QUIC too (`dbsync serve`).
    pub enabled: bool,
    /// UDP address; none: the HTTP listen address (same port number, UDP).
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain (CA-issued); none: a self-signed certificate kept beside the key
    /// file.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// PEM roots a receiver trusts for senders it has no pinned fingerprint for (in addition to
    /// the Web PKI roots).
    pub ca_file: Option<PathBuf>,
    /// Bytes a peer may send on one stream before it is read (flow-control window).
    pub stream_receive_window: u64,
    /// Bytes a peer may send on all streams of a connection before they are read.
    pub receive_window: u64,
    /// Bytes sent and not yet acknowledged, per connection.
    pub send_window: u64,
    /// UDP socket send and receive buffers (SO_SNDBUF / SO_RCVBUF).
    pub socket_buffer_bytes: usize,
    /// Streams a peer may have open at once (one session each).
    pub max_streams: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout_secs: u64,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            cert_file: None,
            key_file: None,
            ca_file: None,
            stream_receive_window: 8 * 1024 * 1024,
            receive_window: 16 * 1024 * 1024,
            send_window: 16 * 1024 * 1024,
            socket_buffer_bytes: 4 * 1024 * 1024,
            max_streams: 4,
            idle_timeout_secs: 60,
        }
    }
}

/// A certificate and its key.
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf, lowercase hex.
    pub fingerprint: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint(cert: &[u8]) -> String {
    hex::encode(Sha256::digest(cert))
}

fn tls_error(what: impl std::fmt::Display) -> Error {
    Error::invalid("quic", what.to_string())
}

impl Identity {
    /// The configured certificate, if both files are set.
    pub fn configured(config: &QuicConfig) -> Result<Option<Self>> {
        match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => Self::from_pem_files(cert, key).map(Some),
            _ => Ok(None),
        }
    }

    /// The files of the site's self-signed certificate beside its key file
    /// (`<stem>-quic-cert.der`, `<stem>-quic-key.der`).
    pub fn files_beside(site_key_file: &Path) -> (PathBuf, PathBuf) {
        let dir = site_key_file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        let stem = site_key_file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dbsync");
        (
            dir.join(format!("{stem}-quic-cert.der")),
            dir.join(format!("{stem}-quic-key.der")),
        )
    }

    /// A new self-signed certificate and its PKCS#8 key, DER.
    pub fn generate() -> Result<(Vec<u8>, Vec<u8>)> {
        let generated =
            rcgen::generate_simple_self_signed(vec!["dbsync".to_owned()]).map_err(tls_error)?;
        Ok((
            generated.cert.der().to_vec(),
            generated.signing_key.serialize_der(),
        ))
    }

    /// An identity from a DER certificate and PKCS#8 key.
    pub fn from_der(cert: Vec<u8>, key: Vec<u8>) -> Self {
        Self {
            fingerprint: fingerprint(&cert),
            chain: vec![CertificateDer::from(cert)],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        }
    }

    /// The configured certificate, or the site's self-signed one beside its key file (created
    /// on first use, the key with mode 0600).
    pub fn load_or_create(config: &QuicConfig, site_key_file: &Path) -> Result<Self> {
        if let Some(configured) = Self::configured(config)? {
            return Ok(configured);
        }
        let (cert_path, key_path) = Self::files_beside(site_key_file);
        if !cert_path.exists() || !key_path.exists() {
            let (cert, key) = Self::generate()?;
            if let Some(dir) = cert_path.parent() {
                std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
            }
            write_private(&key_path, &key)?;
            std::fs::write(&cert_path, &cert).map_err(Error::io(&cert_path))?;
            tracing::info!(path = %cert_path.display(), "generated the site's QUIC certificate");
        }
        let cert = std::fs::read(&cert_path).map_err(Error::io(&cert_path))?;
        let key = std::fs::read(&key_path).map_err(Error::io(&key_path))?;
        Ok(Self::from_der(cert, key))
    }

    fn from_pem_files(cert: &Path, key: &Path) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| tls_error(format!("{}: {e}", cert.display())))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| tls_error(format!("{}: {e}", cert.display())))?;
        let leaf = chain
            .first()
            .ok_or_else(|| tls_error(format!("{}: no certificate", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| tls_error(format!("{}: {e}", key.display())))?;
        Ok(Self {
            fingerprint: fingerprint(leaf),
            chain,
            key,
        })
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(path))?;
    file.write_all(bytes).map_err(Error::io(path))?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(Error::io(path))?;
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport parameters for bulk transfer. Memory per connection is bounded by the windows:
/// at most `receive_window` buffered for reading and `send_window` for sending. Only a client
/// (`keep_alive`) sends keep-alives: a server that did would keep a silent client's connection
/// open past the idle timeout for it.
pub fn transport_config(config: &QuicConfig, keep_alive: bool) -> TransportConfig {
    let mut transport = TransportConfig::default();
    let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(config.max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(varint(config.stream_receive_window))
        .receive_window(varint(config.receive_window))
        .send_window(config.send_window)
        .keep_alive_interval(keep_alive.then_some(Duration::from_secs(10)))
        .max_idle_timeout(
            Duration::from_secs(config.idle_timeout_secs.max(1))
                .try_into()
                .ok(),
        );
    transport
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A server endpoint on `addr` with the site's identity.
pub fn server_endpoint(
    addr: SocketAddr,
    identity: &Identity,
    config: &QuicConfig,
) -> Result<Endpoint> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(config, false)));
    let cannot_bind =
        |e: std::io::Error| Error::Config(format!("cannot listen on udp {addr}: {e}"));
    let socket = udp_socket(addr, config.socket_buffer_bytes).map_err(cannot_bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| tls_error("no async runtime for QUIC"))?;
    Endpoint::new(EndpointConfig::default(), Some(server), socket, runtime).map_err(cannot_bind)
}

/// How a receiver checks the sender's certificate.
#[derive(Debug, Clone)]
pub enum Verify {
    /// The leaf's SHA-256 must be this (hex).
    Pinned(String),
    /// A chain to the Web PKI roots or the configured CA file, valid for the host name.
    Roots(Option<PathBuf>),
}

/// Why a QUIC session could not be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// Nothing answered, or the path broke: another transport may work.
    Unreachable(String),
    /// The peer answered and the handshake failed (certificate, protocol): do not fall back.
    Refused(String),
}

/// An open QUIC connection (kept alive while its session runs).
#[derive(Debug)]
pub struct QuicConnection {
    /// The connection.
    pub connection: quinn::Connection,
    endpoint: Endpoint,
}

impl QuicConnection {
    /// Closes the connection and waits briefly for the peer to learn of it.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// Opens a QUIC connection to `addr` and one session stream on it.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    verify: &Verify,
    config: &QuicConfig,
    limits: Limits,
    timeout: Duration,
) -> std::result::Result<(Link, QuicConnection), ConnectError> {
    use ConnectError::{Refused, Unreachable};
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Refused(e.to_string()))?;
    let mut tls = match verify {
        Verify::Pinned(expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                expected: expected.to_ascii_lowercase(),
                provider: provider(),
            }))
            .with_no_client_auth(),
        Verify::Roots(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(path) = ca_file {
                use rustls::pki_types::pem::PemObject;
                let refused =
                    |e: &dyn std::fmt::Display| Refused(format!("{}: {e}", path.display()));
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| refused(&e))? {
                    roots
                        .add(cert.map_err(|e| refused(&e))?)
                        .map_err(|e| refused(&e))?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| Refused(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(config, true)));
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid address")
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let socket =
        udp_socket(bind, config.socket_buffer_bytes).map_err(|e| Unreachable(e.to_string()))?;
    let runtime = quinn::default_runtime().ok_or_else(|| Refused("no async runtime".into()))?;
    let mut endpoint = Endpoint::new(EndpointConfig::default(), None, socket, runtime)
        .map_err(|e| Unreachable(e.to_string()))?;
    endpoint.set_default_client_config(client);
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| Refused(e.to_string()))?;
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| {
            Unreachable(format!(
                "no QUIC answer from {addr} within {} s (is UDP blocked?)",
                timeout.as_secs()
            ))
        })?
        .map_err(|e| match e {
            // The handshake itself failed: a certificate or protocol refusal.
            quinn::ConnectionError::TransportError(_)
            | quinn::ConnectionError::ConnectionClosed(_) => {
                Refused(format!("QUIC handshake with {addr} failed: {e}"))
            }
            other => Unreachable(other.to_string()),
        })?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| Unreachable(e.to_string()))?;
    Ok((
        Link::spawn(
            QuicReader {
                stream: recv,
                limits,
            },
            QuicWriter { stream: send },
            limits,
        ),
        QuicConnection {
            connection,
            endpoint,
        },
    ))
}

/// Accepts exactly one certificate: the pinned one.
#[derive(Debug)]
struct PinnedVerifier {
    expected: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let actual = fingerprint(end_entity);
        if actual == self.expected {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {actual} is not the pinned {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The reading half of a session stream.
pub struct QuicReader {
    stream: quinn::RecvStream,
    limits: Limits,
}

impl QuicReader {
    /// Wraps the receiving side of a stream.
    pub fn new(stream: quinn::RecvStream, limits: Limits) -> Self {
        Self { stream, limits }
    }
}

impl FrameReader for QuicReader {
    async fn read_frame(&mut self) -> std::result::Result<Option<Vec<u8>>, LinkFailure> {
        read_framed(&mut self.stream, &self.limits).await
    }
}

/// The writing half of a session stream.
pub struct QuicWriter {
    stream: quinn::SendStream,
}

impl QuicWriter {
    /// Wraps the sending side of a stream.
    pub fn new(stream: quinn::SendStream) -> Self {
        Self { stream }
    }
}

impl FrameWriter for QuicWriter {
    async fn write_frame(&mut self, frame: Vec<u8>) -> std::result::Result<(), String> {
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| e.to_string())
    }

    async fn finish(&mut self) {
        let _ = self.stream.finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.stream.stopped()).await;
    }
}

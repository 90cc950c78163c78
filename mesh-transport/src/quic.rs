//! QUIC (quinn + rustls with ring), mutually authenticated by node keys.
//!
//! Both ends present their ed25519 node key as an RFC 7250 *raw public key*
//! (a 44-byte SubjectPublicKeyInfo): there are no certificates, no CA and no
//! X.509 parser on the path. The handshake signature (TLS 1.3
//! CertificateVerify) proves possession of the key, so:
//!
//! * the connecting side pins the node id it asked for; the verifier refuses
//!   any other key *before* the client presents its own key, and
//!   [`connect`](Transport::connect) reports
//!   [`TransportError::PeerMismatch`] with the id that answered;
//! * the accepting side learns the remote node id from the handshake and asks
//!   its [`Admission`] whether that key may use the negotiated ALPN
//!   ([`Protocol::alpn`]).
//!
//! A QUIC client considers its handshake complete before the server has
//! checked the client's key, so a refused client would otherwise see a
//! "connected" connection that dies on first use. Here the server confirms
//! admission explicitly: it opens the connection's message stream and writes
//! one byte; `connect` returns only after reading it, and a refusal (an
//! application close with code [`REFUSED`]) becomes
//! [`TransportError::Refused`].
//!
//! Each [`Connection`] is one QUIC connection carrying one bidirectional
//! stream of length-prefixed messages (a 4-byte big-endian length, then the
//! bytes). A peer that announces a message over the limit, or ends the stream
//! inside a message, is disconnected (application close [`PROTOCOL_VIOLATION`]);
//! other connections are unaffected.
//!
//! Beside the message stream, a connection of a **registered** protocol
//! (files, media, an app's own: see `Transport::serve`) carries application
//! streams (bidirectional and unidirectional, with quinn's priorities,
//! reset and stop codes; up to [`QuicConfig::max_streams`] of each kind open
//! at once) and unreliable datagrams (RFC 9221, up to the path's current
//! maximum). The stream limits are raised only once the connection is
//! admitted, and never for pairing or the device session, which carry
//! messages only: an unpaired key can open no stream, and no peer can make
//! this node buffer stream data nothing reads.
//!
//! # Flow-control windows
//!
//! A stream can only keep its flow-control window in flight, so its rate is
//! at most window / RTT. A fast LAN is 1 Gbit/s (125 MB/s); its RTT is under
//! 1 ms wired, but 5–30 ms on a loaded Wi-Fi network. Filling 1 Gbit/s at
//! 30 ms needs 125 MB/s × 0.03 s ≈ 3.75 MB, so the default stream window is
//! **4 MiB** (quinn's default, 1.25 MB, is sized for 100 Mbit/s at 100 ms and
//! would cap one stream at ~400 Mbit/s at 25 ms). The connection window is
//! **16 MiB**, so four streams can run at full window together, and the send
//! window matches it. The windows are also the most a peer can make this
//! node buffer on a connection whose streams are not read; streams exist
//! only on registered protocols, whose handlers read them, and only for the
//! keys those handlers admit.
//!
//! Session resumption and 0-RTT are off: every connection runs a full
//! handshake, so a revoked key can never ride on an old ticket. Stateless
//! resets use a key derived from the node key, so peers of a node that
//! crashed and came back learn at once that their connections are gone.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use mesh_core::identity::NodeKey;
//! use mesh_core::transport::{AdmitAll, Protocol, Transport};
//! use mesh_transport::quic::{QuicConfig, QuicTransport};
//!
//! let (a, b) = (Arc::new(NodeKey::generate()), Arc::new(NodeKey::generate()));
//! let local = "127.0.0.1:0".parse()?;
//! let ta = QuicTransport::bind(a.clone(), local, Arc::new(AdmitAll), QuicConfig::default())?;
//! let tb = QuicTransport::bind(b.clone(), local, Arc::new(AdmitAll), QuicConfig::default())?;
//! let addr = tb.addr();
//! let (conn, incoming) = tokio::join!(
//!     ta.connect(b.node_id(), &addr, Protocol::MESH),
//!     tb.accept(),
//! );
//! let (conn, incoming) = (conn?, incoming?);
//! assert_eq!(incoming.remote_node(), a.node_id()); // learnt from the handshake
//! conn.send(b"hello".to_vec()).await?;
//! assert_eq!(incoming.recv().await?, b"hello");
//! # Ok(()) }
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use mesh_core::identity::{NODE_ID_LEN, NodeId, NodeKey};
use mesh_core::transport::{
    Admission, Capabilities, Connection, IncomingStream, PeerAddr, Priority, Protocol, RecvStream,
    SendStream, StreamError, Transport, TransportError,
};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, ReadError, ReadExactError, SendDatagramError, VarInt, WriteError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureAlgorithm, SignatureScheme};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::memory::MAX_MESSAGE;

/// Application close code: the accepting node does not admit this key for
/// the requested protocol.
pub const REFUSED: u32 = 0x4D01;
/// Application close code: the peer broke the message framing (a length over
/// the limit, or a stream that ended inside a message).
pub const PROTOCOL_VIOLATION: u32 = 0x4D02;
/// Application close code: an orderly close by [`Connection::close`].
pub const CLOSED: u32 = 0;

/// The byte the accepting side writes once it has admitted the connection.
const ADMITTED: u8 = 0x01;
/// The TLS server name sent by clients. Identity comes from the pinned key,
/// never from this name.
const SERVER_NAME: &str = "mesh-node";
/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE,
/// AlgorithmIdentifier { 1.3.101.112 }, BIT STRING of 33 bytes (0 unused bits).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// How long a closing connection waits for the peer to take queued messages.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a closing connection then waits for the peer's application to
/// read them and close (see `QuicConnection::close_gracefully`).
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Length of the 4-byte message length prefix.
const LEN_PREFIX: usize = 4;

/// Settings of a [`QuicTransport`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QuicConfig {
    /// A connection with no traffic (keep-alives included) for this long is
    /// closed. Default 30 s.
    pub idle_timeout: Duration,
    /// How often an idle connection sends a keep-alive; `None` for never.
    /// Default 10 s.
    pub keep_alive_interval: Option<Duration>,
    /// Whether keep-alives are sent while the device runs on battery (see
    /// [`QuicTransport::set_on_battery`]). Default `false`: on battery, idle
    /// connections are allowed to lapse rather than wake the radio.
    pub keep_alive_on_battery: bool,
    /// How long a handshake, including the admission check, may take.
    /// Default 10 s.
    pub handshake_timeout: Duration,
    /// The largest message carried. Default: a full wire frame
    /// ([`MAX_MESSAGE`]).
    pub max_message: usize,
    /// Handshakes run at once on the accepting side; further attempts are
    /// refused until one finishes. Default 256.
    pub max_pending_handshakes: usize,
    /// New connection attempts accepted from one source address, counted
    /// only once the address is validated (see `retry_above`) and decided
    /// from the attempt's packet before any cryptography: over it, the
    /// attempt is refused with a stateless `CONNECTION_REFUSED`. Default
    /// 20/s, burst 200 (a LAN host connects a handful of times; a flood
    /// from one host costs the node a packet parse and a refusal per
    /// attempt). 4,096 sources are remembered; past that the fullest
    /// bucket makes room, so nobody is locked out.
    pub handshakes_per_source: mesh_core::limits::Rate,
    /// With this many handshakes running or more (clamped below
    /// `max_pending_handshakes`), an attempt from an address not yet
    /// validated is first sent a stateless Retry (QUIC's address
    /// validation): a spoofed source never comes back, so it can neither
    /// hold a handshake slot nor spend another host's rate. Default 0:
    /// always, at the cost of one round trip per new connection (well
    /// under a millisecond on a LAN). Above 0, unvalidated attempts below
    /// the threshold go ahead uncharged; so do attempts from IPv6
    /// link-local addresses, which quinn 0.11's Retry cannot validate.
    pub retry_above: usize,
    /// Admitted connections waiting for [`Transport::accept`]. Default 64.
    pub accept_backlog: usize,
    /// Streams of each kind (bidirectional, unidirectional) the peer may
    /// have open at once on a connection of a registered protocol, beyond
    /// the message stream. Pairing and device-session connections allow
    /// none. Default 100.
    pub max_streams: u32,
    /// Bytes one stream may have in flight unread (its flow-control
    /// window). Default 4 MiB: see "Flow-control windows" in the module
    /// docs.
    pub stream_receive_window: u32,
    /// Bytes all streams of a connection together may have unread.
    /// Default 16 MiB.
    pub receive_window: u32,
    /// Bytes this side keeps unacknowledged in flight on a connection.
    /// Default 16 MiB.
    pub send_window: u64,
    /// Datagrams received and not yet read are kept up to this many bytes
    /// per connection (older ones are dropped first). Default 64 KiB; a
    /// media layer that reads them as they come may raise it.
    pub datagram_receive_buffer: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(10)),
            keep_alive_on_battery: false,
            handshake_timeout: Duration::from_secs(10),
            max_message: MAX_MESSAGE,
            max_pending_handshakes: 256,
            handshakes_per_source: mesh_core::limits::Rate::per_second(20.0, 200),
            retry_above: 0,
            accept_backlog: 64,
            max_streams: 100,
            stream_receive_window: 4 * 1024 * 1024,
            receive_window: 16 * 1024 * 1024,
            send_window: 16 * 1024 * 1024,
            datagram_receive_buffer: 64 * 1024,
        }
    }
}

impl QuicConfig {
    fn keep_alive(&self, on_battery: bool) -> Option<Duration> {
        if on_battery && !self.keep_alive_on_battery {
            None
        } else {
            self.keep_alive_interval
        }
    }

    /// The transport parameters of a new connection. `incoming_bidi` is
    /// how many bidirectional streams the peer may open before admission
    /// (the accepting side opens the message stream, so a client allows 1
    /// and a server 0); a mesh connection raises the limits once admitted.
    fn transport(
        &self,
        on_battery: bool,
        incoming_bidi: u32,
    ) -> Result<quinn::TransportConfig, TransportError> {
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Io("idle_timeout is too large for QUIC".into()))?;
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive(on_battery))
            .max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .datagram_receive_buffer_size(Some(self.datagram_receive_buffer))
            .datagram_send_buffer_size(self.datagram_receive_buffer);
        Ok(t)
    }
}

/// The node key as a rustls signing key: the secret never leaves [`NodeKey`].
#[derive(Debug)]
struct NodeSigner(Arc<NodeKey>);

impl SigningKey for NodeSigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(NodeSignerOnce(self.0.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(spki(&self.0.node_id())))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

#[derive(Debug)]
struct NodeSignerOnce(Arc<NodeKey>);

impl Signer for NodeSignerOnce {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(self.0.sign(message).to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// The SubjectPublicKeyInfo of a node id.
fn spki(node: &NodeId) -> Vec<u8> {
    let mut der = Vec::with_capacity(ED25519_SPKI_PREFIX.len() + NODE_ID_LEN);
    der.extend_from_slice(&ED25519_SPKI_PREFIX);
    der.extend_from_slice(node.as_bytes());
    der
}

/// The node id in a raw public key, if it is a valid ed25519 key.
fn node_from_spki(der: &[u8]) -> Option<NodeId> {
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let key: &[u8; NODE_ID_LEN] = key.try_into().ok()?;
    NodeId::from_bytes(key).ok()
}

fn bad_key() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
}

/// Checks a TLS 1.3 CertificateVerify signature made with a raw ed25519 key.
fn verify_signature(
    message: &[u8],
    key: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let node = node_from_spki(key).ok_or_else(bad_key)?;
    let signature: &[u8; 64] = dss
        .signature()
        .try_into()
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    node.verify(message, signature)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// The connecting side's verifier: accepts exactly one node key and records
/// whichever key the server presented, so a mismatch can name it.
#[derive(Debug)]
struct PinnedServer {
    expected: NodeId,
    seen: Mutex<Option<NodeId>>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let node = node_from_spki(end_entity).ok_or_else(bad_key)?;
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(node);
        if !intermediates.is_empty() || node != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The accepting side's verifier: any valid ed25519 key proves who the client
/// is; whether that key may use the protocol is [`Admission`]'s decision,
/// taken once the ALPN is known.
#[derive(Debug)]
struct AnyNodeClient;

impl ClientCertVerifier for AnyNodeClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() || node_from_spki(end_entity).is_none() {
            return Err(bad_key());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The stateless-reset key (RFC 9000 §10.3) and the connection-id key,
/// derived from the node key (ed25519 signatures are deterministic): a node
/// restarted after a crash recognises its old connection ids and answers
/// their packets with resets the peers accept, so they notice at once
/// instead of after the idle timeout.
fn restart_keys(key: &NodeKey) -> (ring::hmac::Key, u64) {
    let seed = key.sign(b"mesh-sdk/quic/restart-keys/v1");
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed[..32]);
    let mut cid = [0u8; 8];
    cid.copy_from_slice(&seed[32..40]);
    (reset, u64::from_le_bytes(cid))
}

fn tls_error(e: rustls::Error) -> TransportError {
    TransportError::Io(format!("TLS configuration: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls and quinn settings shared by every connection of one endpoint.
struct Tls {
    certified: Arc<CertifiedKey>,
    client_template: rustls::ClientConfig,
}

impl Tls {
    fn new(key: Arc<NodeKey>) -> Result<Self, TransportError> {
        let node = key.node_id();
        Self::with_key(node, Arc::new(NodeSigner(key)))
    }

    /// Presents `node` and signs with `signer` (a different key only in tests).
    fn with_key(node: NodeId, signer: Arc<dyn SigningKey>) -> Result<Self, TransportError> {
        let certified = Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(spki(&node))],
            signer,
        ));
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServer {
                expected: node,
                seen: Mutex::new(None),
            }))
            .with_client_cert_resolver(Arc::new(
                rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified.clone()),
            ));
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_early_data = false;
        Ok(Tls {
            certified,
            client_template: client,
        })
    }

    fn server(&self, protocols: &[Protocol]) -> Result<QuicServerConfig, TransportError> {
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_client_cert_verifier(Arc::new(AnyNodeClient))
            .with_cert_resolver(Arc::new(
                rustls::server::AlwaysResolvesServerRawPublicKeys::new(self.certified.clone()),
            ));
        server.alpn_protocols = protocols.iter().map(|p| p.alpn().to_vec()).collect();
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.max_early_data_size = 0;
        QuicServerConfig::try_from(server).map_err(|e| TransportError::Io(e.to_string()))
    }

    fn client(
        &self,
        expected: NodeId,
        protocol: Protocol,
    ) -> Result<(QuicClientConfig, Arc<PinnedServer>), TransportError> {
        let pin = Arc::new(PinnedServer {
            expected,
            seen: Mutex::new(None),
        });
        let mut client = self.client_template.clone();
        client.dangerous().set_certificate_verifier(pin.clone());
        client.alpn_protocols = vec![protocol.alpn().to_vec()];
        let quic =
            QuicClientConfig::try_from(client).map_err(|e| TransportError::Io(e.to_string()))?;
        Ok((quic, pin))
    }
}

struct Shared {
    endpoint: quinn::Endpoint,
    node: NodeId,
    tls: Tls,
    config: QuicConfig,
    on_battery: AtomicBool,
    /// What is accepted, and who may use it (see [`Transport::serve`]).
    serving: Mutex<Serving>,
    /// What the accept loop turned away before any handshake work.
    incoming: IncomingCounters,
}

/// Counters of the accepting side.
#[derive(Debug, Default)]
struct IncomingCounters {
    refused_rate: std::sync::atomic::AtomicU64,
    refused_busy: std::sync::atomic::AtomicU64,
    refused_serving_nothing: std::sync::atomic::AtomicU64,
    refused_unvalidated: std::sync::atomic::AtomicU64,
    retries: std::sync::atomic::AtomicU64,
    handshakes: std::sync::atomic::AtomicU64,
}

/// What a [`QuicTransport`]'s accepting side did with connection attempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IncomingStats {
    /// Refused from their first packet: over their source's rate
    /// ([`QuicConfig::handshakes_per_source`]).
    pub refused_rate: u64,
    /// Refused from their first packet: as many handshakes running as
    /// allowed ([`QuicConfig::max_pending_handshakes`]).
    pub refused_busy: u64,
    /// Refused from their first packet: the node serves no protocol.
    pub refused_serving_nothing: u64,
    /// Refused: back from a Retry without a token that validates the
    /// address.
    pub refused_unvalidated: u64,
    /// Sent a stateless Retry to validate their address.
    pub retries: u64,
    /// Handshakes started.
    pub handshakes: u64,
}

struct Serving {
    protocols: Vec<Protocol>,
    admission: Arc<dyn Admission>,
}

impl Shared {
    /// Whether no protocol is served (checked for every connection attempt:
    /// no copy of the list).
    fn serves_nothing(&self) -> bool {
        self.serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .protocols
            .is_empty()
    }

    fn serving(&self) -> (Vec<Protocol>, Arc<dyn Admission>) {
        let s = self.serving.lock().unwrap_or_else(PoisonError::into_inner);
        (s.protocols.clone(), s.admission.clone())
    }

    /// Installs the server configuration for the current protocols and
    /// power state (with no protocol, the accept loop refuses every
    /// connection attempt). Under the serving lock, so a concurrent `serve`
    /// and `set_on_battery` cannot install a stale list.
    fn reconfigure(&self) -> Result<(), TransportError> {
        let serving = self.serving.lock().unwrap_or_else(PoisonError::into_inner);
        self.install(&serving.protocols)
    }

    fn install(&self, protocols: &[Protocol]) -> Result<(), TransportError> {
        let on_battery = self.on_battery.load(Ordering::Relaxed);
        let server = server_config(&self.tls, &self.config, on_battery, protocols)?;
        self.endpoint.set_server_config(Some(server));
        Ok(())
    }
}

fn server_config(
    tls: &Tls,
    config: &QuicConfig,
    on_battery: bool,
    protocols: &[Protocol],
) -> Result<quinn::ServerConfig, TransportError> {
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls.server(protocols)?));
    // The accepting side opens the one message stream; it accepts none.
    server.transport_config(Arc::new(config.transport(on_battery, 0)?));
    Ok(server)
}

/// A QUIC endpoint: connects out and accepts in, authenticated by node keys.
///
/// Must be created inside a tokio runtime (quinn drives its socket from it).
/// Dropping the transport stops accepting and closes its connections.
pub struct QuicTransport {
    shared: Arc<Shared>,
    incoming: AsyncMutex<mpsc::Receiver<QuicConnection>>,
    acceptor: JoinHandle<()>,
}

impl fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicTransport")
            .field("node", &self.shared.node)
            .field("local_addr", &self.shared.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// Binds a UDP socket at `addr` (port 0 picks a free one) and starts
    /// accepting connections that `admission` lets in. An unspecified
    /// address (`0.0.0.0` or `[::]`) binds one dual-stack socket: the node
    /// reaches and is reached over IPv4 and IPv6 alike.
    pub fn bind(
        key: Arc<NodeKey>,
        addr: SocketAddr,
        admission: Arc<dyn Admission>,
        config: QuicConfig,
    ) -> Result<Self, TransportError> {
        if config.max_message > u32::MAX as usize {
            return Err(TransportError::Io(
                "max_message must fit the 4-byte length prefix".into(),
            ));
        }
        let node = key.node_id();
        let (reset_key, cid_key) = restart_keys(&key);
        let tls = Tls::new(key)?;
        let socket =
            bind_udp(addr).map_err(|e| TransportError::Io(format!("binding UDP {addr}: {e}")))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Io("QUIC needs a tokio runtime".into()))?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // Connection ids the restarted node still recognises as its own, so
        // it answers their packets with a stateless reset.
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let protocols = vec![Protocol::PAIRING, Protocol::MESH];
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config(&tls, &config, false, &protocols)?),
            socket,
            runtime,
        )
        .map_err(|e| TransportError::Io(format!("starting QUIC on {addr}: {e}")))?;
        let shared = Arc::new(Shared {
            endpoint,
            node,
            tls,
            config,
            on_battery: AtomicBool::new(false),
            serving: Mutex::new(Serving {
                protocols,
                admission,
            }),
            incoming: IncomingCounters::default(),
        });
        let (tx, rx) = mpsc::channel(shared.config.accept_backlog.max(1));
        let acceptor = tokio::spawn(accept_loop(shared.clone(), tx));
        Ok(QuicTransport {
            shared,
            incoming: AsyncMutex::new(rx),
            acceptor,
        })
    }

    /// What the accepting side did with connection attempts so far.
    pub fn incoming_stats(&self) -> IncomingStats {
        let c = &self.shared.incoming;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        IncomingStats {
            refused_rate: n(&c.refused_rate),
            refused_busy: n(&c.refused_busy),
            refused_serving_nothing: n(&c.refused_serving_nothing),
            refused_unvalidated: n(&c.refused_unvalidated),
            retries: n(&c.retries),
            handshakes: n(&c.handshakes),
        }
    }

    /// The bound socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The address peers connect to.
    pub fn addr(&self) -> PeerAddr {
        PeerAddr::Socket(self.local_addr())
    }

    /// Tells the transport whether the device runs on battery. New
    /// connections (both directions) then follow
    /// [`QuicConfig::keep_alive_on_battery`]; open ones keep their settings.
    /// (Also [`Transport::set_on_battery`], which the node runtime calls.)
    pub fn set_on_battery(&self, on_battery: bool) -> Result<(), TransportError> {
        self.shared.on_battery.store(on_battery, Ordering::Relaxed);
        self.shared.reconfigure()
    }

    /// See [`Transport::serve`]: advertises exactly `protocols` from now on
    /// (none: incoming connections are refused) and asks `admission`.
    pub fn serve(
        &self,
        protocols: &[Protocol],
        admission: Arc<dyn Admission>,
    ) -> Result<(), TransportError> {
        let mut s = self
            .shared
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.shared.install(protocols)?;
        s.protocols = protocols.to_vec();
        s.admission = admission;
        Ok(())
    }

    /// Whether the transport was told the device runs on battery.
    pub fn on_battery(&self) -> bool {
        self.shared.on_battery.load(Ordering::Relaxed)
    }

    /// The keep-alive interval new connections get now (`None`: off).
    pub fn keep_alive_now(&self) -> Option<Duration> {
        self.shared.config.keep_alive(self.on_battery())
    }

    /// Closes every connection and waits (at most `grace`) until the peers
    /// have been told.
    pub async fn shutdown(&self, grace: Duration) {
        self.acceptor.abort();
        self.shared
            .endpoint
            .close(VarInt::from(CLOSED), b"node shutting down");
        let _ = tokio::time::timeout(grace, self.shared.endpoint.wait_idle()).await;
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.shared
            .endpoint
            .close(VarInt::from(CLOSED), b"node shutting down");
    }
}

/// The source an attempt is limited as: its address (IPv4, or full IPv6:
/// every host on a link shares its /64, so a per-/64 key would let one host
/// spend the rate of all of them).
fn source_of(addr: SocketAddr) -> std::net::IpAddr {
    addr.ip().to_canonical()
}

/// Whether a Retry can validate `addr`. quinn 0.11 encodes a Retry token's
/// address without its IPv6 scope id but compares it with one, so a token
/// sent to a link-local address (`fe80::…%iface`) never validates and the
/// client is refused. Such attempts are not retried: they go ahead
/// uncharged, like any unvalidated attempt, bounded by the handshake cap.
fn retry_works(addr: SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(a) => a.scope_id() == 0,
        SocketAddr::V4(_) => true,
    }
}

/// How many sources the per-source handshake rate remembers.
const MAX_SOURCES: usize = 4096;

async fn accept_loop(shared: Arc<Shared>, tx: mpsc::Sender<QuicConnection>) {
    let max = shared.config.max_pending_handshakes.max(1);
    // A threshold at or above the cap would never be reached.
    let retry_above = shared.config.retry_above.min(max - 1);
    let pending = Arc::new(Semaphore::new(max));
    // Evicting when full: a flood of (validated) sources loosens the limit
    // for a moment but never locks a newcomer out; the handshake cap and
    // the protocols' own limits hold the total.
    let mut per_source =
        mesh_core::limits::KeyedLimiter::evicting(shared.config.handshakes_per_source, MAX_SOURCES);
    let started = std::time::Instant::now();
    let count = |c: &std::sync::atomic::AtomicU64| {
        c.fetch_add(1, Ordering::Relaxed);
    };
    // Every check here works from the first packet alone, before any
    // cryptography: a flood costs a packet parse and a stateless answer
    // per attempt.
    while let Some(incoming) = shared.endpoint.accept().await {
        if shared.serves_nothing() {
            // Serving nothing (a worker with no protocol of its own).
            count(&shared.incoming.refused_serving_nothing);
            incoming.refuse();
            continue;
        }
        let running = max - pending.available_permits();
        let validated = incoming.remote_address_validated();
        if !validated && running >= retry_above && retry_works(incoming.remote_address()) {
            if incoming.may_retry() {
                // The source proves it receives at its address before it
                // costs a handshake or touches a rate (by default, always:
                // a LAN round trip is well under a millisecond).
                count(&shared.incoming.retries);
                let _ = incoming.retry();
            } else {
                // Came back from a Retry without a valid token: not the
                // address it claims (or a token too old).
                count(&shared.incoming.refused_unvalidated);
                incoming.refuse();
            }
            continue;
        }
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            count(&shared.incoming.refused_busy);
            incoming.refuse();
            continue;
        };
        // Only a validated address is charged: a spoofed packet cannot
        // spend another host's rate and lock it out.
        let now = mesh_core::clock::monotonic_since(started);
        if validated && !per_source.try_take(&source_of(incoming.remote_address()), now) {
            drop(permit);
            count(&shared.incoming.refused_rate);
            incoming.refuse();
            continue;
        }
        count(&shared.incoming.handshakes);
        let (shared, tx) = (shared.clone(), tx.clone());
        tokio::spawn(async move {
            let timeout = shared.config.handshake_timeout;
            let admitted = tokio::time::timeout(timeout, admit(&shared, incoming)).await;
            drop(permit);
            if let Ok(Some(conn)) = admitted {
                // A full backlog holds the connection until the node accepts;
                // a dropped transport drops it.
                let _ = tx.send(conn).await;
            }
        });
    }
}

/// Runs the handshake, checks admission and confirms it to the client.
async fn admit(shared: &Shared, incoming: quinn::Incoming) -> Option<QuicConnection> {
    let conn = incoming.accept().ok()?.await.ok()?;
    let remote = peer_node(&conn)?;
    let (protocols, admission) = shared.serving();
    let Some(protocol) = negotiated(&conn, &protocols) else {
        conn.close(VarInt::from(REFUSED), b"no protocol this node serves");
        return None;
    };
    if !admission.admit(&remote, protocol) {
        let reason = format!("this node does not admit your key for {protocol:?}");
        conn.close(VarInt::from(REFUSED), reason.as_bytes());
        return None;
    }
    let (mut send, recv) = conn.open_bi().await.ok()?;
    send.write_all(&[ADMITTED]).await.ok()?;
    if protocol.carries_streams() {
        // Admitted: the peer may now open streams beside the messages.
        let n = VarInt::from_u32(shared.config.max_streams);
        conn.set_max_concurrent_bi_streams(n);
        conn.set_max_concurrent_uni_streams(n);
    }
    Some(QuicConnection::new(
        conn,
        send,
        recv,
        remote,
        protocol,
        shared.config.max_message,
    ))
}

fn peer_node(conn: &quinn::Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let keys = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_from_spki(keys.first()?)
}

fn negotiated(conn: &quinn::Connection, known: &[Protocol]) -> Option<Protocol> {
    let data = conn.handshake_data()?.downcast::<HandshakeData>().ok()?;
    let alpn = data.protocol?;
    Protocol::find(known, &alpn)
}

fn lost(addr: &PeerAddr, e: ConnectionError) -> TransportError {
    match e {
        ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from(REFUSED) => {
            TransportError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
        }
        ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed => {
            TransportError::Closed
        }
        // A server that is closing or overloaded refuses at the transport
        // level: nobody is serving, which is not an admission decision.
        ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            TransportError::Unreachable { addr: addr.clone() }
        }
        ConnectionError::ConnectionClosed(close) => TransportError::Refused(close.to_string()),
        ConnectionError::TimedOut => TransportError::Unreachable { addr: addr.clone() },
        other => TransportError::Io(other.to_string()),
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn local_node(&self) -> NodeId {
        self.shared.node
    }

    fn set_on_battery(&self, on_battery: bool) -> Result<(), TransportError> {
        QuicTransport::set_on_battery(self, on_battery)
    }

    fn serve(
        &self,
        protocols: &[Protocol],
        admission: Arc<dyn Admission>,
    ) -> Result<(), TransportError> {
        QuicTransport::serve(self, protocols, admission)
    }

    async fn connect(
        &self,
        peer: NodeId,
        addr: &PeerAddr,
        protocol: Protocol,
    ) -> Result<Box<dyn Connection>, TransportError> {
        let PeerAddr::Socket(socket) = addr else {
            return Err(TransportError::AddressNotSupported(addr.clone()));
        };
        let shared = &self.shared;
        let (crypto, pin) = shared.tls.client(peer, protocol)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        // The accepting side opens exactly one stream: the message stream.
        let mut transport = shared
            .config
            .transport(shared.on_battery.load(Ordering::Relaxed), 1)?;
        if !protocol.carries_streams() {
            // A message protocol (pairing, the device session) carries one
            // small message now and then, a heartbeat a second: the peer is
            // asked (QUIC ACK frequency) to acknowledge each at once, in the
            // pass that received it, instead of arming a delayed-ACK timer
            // and waking again for every message. Stream protocols keep
            // QUIC's usual every-other-packet acknowledgements.
            let mut acks = quinn::AckFrequencyConfig::default();
            acks.ack_eliciting_threshold(VarInt::from_u32(0));
            transport.ack_frequency_config(Some(acks));
        }
        client.transport_config(Arc::new(transport));
        let connecting = shared
            .endpoint
            .connect_with(client, *socket, SERVER_NAME)
            .map_err(|e| TransportError::Io(format!("connecting to {addr}: {e}")))?;
        let established = async {
            let conn = match connecting.await {
                Ok(conn) => conn,
                Err(e) => {
                    let seen = *pin.seen.lock().unwrap_or_else(PoisonError::into_inner);
                    return Err(match seen {
                        Some(actual) if actual != peer => TransportError::PeerMismatch {
                            expected: peer,
                            actual,
                        },
                        _ => lost(addr, e),
                    });
                }
            };
            // Admitted only once the server says so (see the module docs).
            let (send, mut recv) = conn.accept_bi().await.map_err(|e| lost(addr, e))?;
            let mut ack = [0u8; 1];
            recv.read_exact(&mut ack).await.map_err(|e| match e {
                ReadExactError::ReadError(ReadError::ConnectionLost(e)) => lost(addr, e),
                other => TransportError::Io(format!("admission: {other}")),
            })?;
            if ack[0] != ADMITTED {
                conn.close(VarInt::from(PROTOCOL_VIOLATION), b"bad admission byte");
                return Err(TransportError::Io(
                    "the peer sent a bad admission byte".into(),
                ));
            }
            if protocol.carries_streams() {
                let n = shared.config.max_streams;
                conn.set_max_concurrent_bi_streams(VarInt::from_u32(n.saturating_add(1)));
                conn.set_max_concurrent_uni_streams(VarInt::from_u32(n));
            }
            Ok(QuicConnection::new(
                conn,
                send,
                recv,
                peer,
                protocol,
                shared.config.max_message,
            ))
        };
        match tokio::time::timeout(shared.config.handshake_timeout, established).await {
            Ok(Ok(conn)) => Ok(Box::new(conn)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::Unreachable { addr: addr.clone() }),
        }
    }

    async fn accept(&self) -> Result<Box<dyn Connection>, TransportError> {
        match self.incoming.lock().await.recv().await {
            Some(conn) => Ok(Box::new(conn)),
            None => Err(TransportError::Closed),
        }
    }
}

/// One authenticated QUIC connection with its message stream.
pub struct QuicConnection {
    conn: quinn::Connection,
    remote: NodeId,
    protocol: Protocol,
    max_message: usize,
    closed: Arc<AtomicBool>,
    send: Arc<AsyncMutex<quinn::SendStream>>,
    recv: AsyncMutex<quinn::RecvStream>,
}

impl fmt::Debug for QuicConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConnection")
            .field("remote", &self.remote)
            .field("protocol", &self.protocol)
            .field("addr", &self.conn.remote_address())
            .finish_non_exhaustive()
    }
}

impl QuicConnection {
    fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        remote: NodeId,
        protocol: Protocol,
        max_message: usize,
    ) -> Self {
        QuicConnection {
            conn,
            remote,
            protocol,
            max_message,
            closed: Arc::new(AtomicBool::new(false)),
            send: Arc::new(AsyncMutex::new(send)),
            recv: AsyncMutex::new(recv),
        }
    }

    /// The peer's socket address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The current round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Finishes the stream so queued messages still arrive, then closes the
    /// connection once the peer has them (or after a grace period) and has
    /// had a moment to read them: a QUIC peer discards what its application
    /// has not read yet when the connection closes, so closing as soon as
    /// the peer's stack acknowledged our last message (a goodbye, typically)
    /// could still lose it. The peer's application closes when it reads the
    /// end of our stream; if it does not within `CLOSE_LINGER`, we close.
    fn close_gracefully(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let (send, conn) = (self.send.clone(), self.conn.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let stopped = {
                        let mut send = send.lock().await;
                        let _ = send.finish();
                        send.stopped()
                    };
                    let _ = tokio::time::timeout(CLOSE_GRACE, stopped).await;
                    let _ = tokio::time::timeout(CLOSE_LINGER, conn.closed()).await;
                    conn.close(VarInt::from(CLOSED), b"closed");
                });
            }
            Err(_) => conn.close(VarInt::from(CLOSED), b"closed"),
        }
    }

    /// Disconnects the peer for breaking the framing.
    fn violation(&self, why: &str) {
        self.closed.store(true, Ordering::Relaxed);
        self.conn
            .close(VarInt::from(PROTOCOL_VIOLATION), why.as_bytes());
    }
}

fn write_error(e: WriteError) -> TransportError {
    match e {
        WriteError::ConnectionLost(_) | WriteError::ClosedStream | WriteError::Stopped(_) => {
            TransportError::Closed
        }
        other => TransportError::Io(other.to_string()),
    }
}

fn read_error(e: ReadError) -> TransportError {
    match e {
        ReadError::ConnectionLost(_) | ReadError::ClosedStream | ReadError::Reset(_) => {
            TransportError::Closed
        }
        other => TransportError::Io(other.to_string()),
    }
}

#[async_trait]
impl Connection for QuicConnection {
    fn remote_node(&self) -> NodeId {
        self.remote
    }

    fn remote_addr(&self) -> Option<PeerAddr> {
        Some(PeerAddr::Socket(self.conn.remote_address()))
    }

    fn protocol(&self) -> Protocol {
        self.protocol
    }

    async fn send(&self, message: Vec<u8>) -> Result<(), TransportError> {
        if message.len() > self.max_message {
            return Err(TransportError::TooLarge {
                len: message.len(),
                max: self.max_message,
            });
        }
        if self.closed.load(Ordering::Relaxed) {
            return Err(TransportError::Closed);
        }
        // `max_message` fits in u32 (checked at bind).
        let len = (message.len() as u32).to_be_bytes();
        let mut chunks = [Bytes::copy_from_slice(&len), Bytes::from(message)];
        let mut send = self.send.lock().await;
        if self.closed.load(Ordering::Relaxed) {
            return Err(TransportError::Closed);
        }
        // A send dropped half-way (its task aborted, a timeout around it)
        // would leave half a message on the stream and everything after it
        // misframed: the connection is closed instead.
        let mut unfinished = Unfinished(Some(self));
        let written = send.write_all_chunks(&mut chunks).await;
        unfinished.0 = None;
        written.map_err(write_error)
    }

    async fn recv(&self) -> Result<Vec<u8>, TransportError> {
        let mut recv = self.recv.lock().await;
        let mut len = [0u8; LEN_PREFIX];
        match recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(0)) => return Err(TransportError::Closed),
            Err(ReadExactError::FinishedEarly(_)) => {
                self.violation("stream ended inside a length prefix");
                return Err(TransportError::Io(
                    "the peer ended the stream inside a message".into(),
                ));
            }
            Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > self.max_message {
            self.violation("message over the limit");
            return Err(TransportError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        let mut message = vec![0u8; len];
        match recv.read_exact(&mut message).await {
            Ok(()) => Ok(message),
            Err(ReadExactError::FinishedEarly(_)) => {
                self.violation("stream ended inside a message");
                Err(TransportError::Io(
                    "the peer ended the stream inside a message".into(),
                ))
            }
            Err(ReadExactError::ReadError(e)) => Err(read_error(e)),
        }
    }

    fn close(&self) {
        self.close_gracefully();
    }

    fn capabilities(&self) -> Capabilities {
        if !self.protocol.carries_streams() {
            return Capabilities::MESSAGES_ONLY;
        }
        Capabilities::MESSAGES_ONLY
            .with_streams(true)
            .with_datagrams(self.conn.max_datagram_size().is_some())
    }

    async fn open_bi(
        &self,
        priority: Priority,
    ) -> Result<(Box<dyn SendStream>, Box<dyn RecvStream>), TransportError> {
        self.streams_allowed()?;
        let (send, recv) = self.conn.open_bi().await.map_err(connection_error)?;
        // Only fails on a stream already closed, which a new one is not.
        let _ = send.set_priority(priority);
        Ok((
            Box::new(QuicSendStream(send)),
            Box::new(QuicRecvStream(recv)),
        ))
    }

    async fn open_uni(&self, priority: Priority) -> Result<Box<dyn SendStream>, TransportError> {
        self.streams_allowed()?;
        let send = self.conn.open_uni().await.map_err(connection_error)?;
        let _ = send.set_priority(priority);
        Ok(Box::new(QuicSendStream(send)))
    }

    async fn accept_stream(&self) -> Result<IncomingStream, TransportError> {
        self.streams_allowed()?;
        // Both accepts are cancel-safe: a stream stays queued until taken.
        tokio::select! {
            bi = self.conn.accept_bi() => {
                let (send, recv) = bi.map_err(connection_error)?;
                Ok(IncomingStream::Bi(Box::new(QuicSendStream(send)), Box::new(QuicRecvStream(recv))))
            }
            uni = self.conn.accept_uni() => {
                let recv = uni.map_err(connection_error)?;
                Ok(IncomingStream::Uni(Box::new(QuicRecvStream(recv))))
            }
        }
    }

    fn max_datagram_size(&self) -> Option<usize> {
        if !self.protocol.carries_streams() {
            return None;
        }
        self.conn.max_datagram_size()
    }

    fn send_datagram(&self, datagram: Vec<u8>) -> Result<(), TransportError> {
        let Some(max) = self.max_datagram_size() else {
            return Err(TransportError::Unsupported("datagrams"));
        };
        if datagram.len() > max {
            return Err(TransportError::TooLarge {
                len: datagram.len(),
                max,
            });
        }
        self.conn
            .send_datagram(Bytes::from(datagram))
            .map_err(|e| match e {
                SendDatagramError::ConnectionLost(_) => TransportError::Closed,
                SendDatagramError::TooLarge => TransportError::TooLarge {
                    len: 0,
                    max: self.conn.max_datagram_size().unwrap_or(0),
                },
                SendDatagramError::UnsupportedByPeer | SendDatagramError::Disabled => {
                    TransportError::Unsupported("datagrams")
                }
            })
    }

    async fn recv_datagram(&self) -> Result<Vec<u8>, TransportError> {
        if !self.protocol.carries_streams() {
            return Err(TransportError::Unsupported("datagrams"));
        }
        let datagram = self.conn.read_datagram().await.map_err(connection_error)?;
        Ok(datagram.to_vec())
    }
}

impl QuicConnection {
    /// Streams are for mesh connections; pairing carries messages only.
    fn streams_allowed(&self) -> Result<(), TransportError> {
        if self.protocol.carries_streams() {
            Ok(())
        } else {
            Err(TransportError::Unsupported(
                "streams on pairing or device-session connections",
            ))
        }
    }
}

fn connection_error(e: ConnectionError) -> TransportError {
    match e {
        ConnectionError::ApplicationClosed(_)
        | ConnectionError::LocallyClosed
        | ConnectionError::ConnectionClosed(_)
        | ConnectionError::Reset
        | ConnectionError::TimedOut => TransportError::Closed,
        other => TransportError::Io(other.to_string()),
    }
}

fn code(v: VarInt) -> u32 {
    u32::try_from(v.into_inner()).unwrap_or(u32::MAX)
}

/// The sending half of a QUIC stream.
#[derive(Debug)]
pub struct QuicSendStream(quinn::SendStream);

#[async_trait]
impl SendStream for QuicSendStream {
    async fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        self.0.write_all(data).await.map_err(|e| match e {
            WriteError::Stopped(c) => StreamError::Stopped(code(c)),
            WriteError::ConnectionLost(_) => StreamError::Closed,
            WriteError::ClosedStream => StreamError::Finished,
            other => StreamError::Io(other.to_string()),
        })
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        self.0.finish().map_err(|_| StreamError::Finished)
    }

    fn reset(&mut self, code: u32) {
        // Fails only on a stream already finished or reset.
        let _ = self.0.reset(VarInt::from_u32(code));
    }

    fn set_priority(&mut self, priority: Priority) -> Result<(), StreamError> {
        self.0
            .set_priority(priority)
            .map_err(|_| StreamError::Finished)
    }
}

/// The receiving half of a QUIC stream.
#[derive(Debug)]
pub struct QuicRecvStream(quinn::RecvStream);

#[async_trait]
impl RecvStream for QuicRecvStream {
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, StreamError> {
        if buf.is_empty() {
            return Ok(Some(0));
        }
        self.0.read(buf).await.map_err(|e| match e {
            ReadError::Reset(c) => StreamError::Reset(code(c)),
            ReadError::ConnectionLost(_) => StreamError::Closed,
            ReadError::ClosedStream => StreamError::Finished,
            other => StreamError::Io(other.to_string()),
        })
    }

    fn stop(&mut self, code: u32) {
        // Fails only on a stream already stopped.
        let _ = self.0.stop(VarInt::from_u32(code));
    }
}

/// Binds the endpoint's UDP socket. An unspecified address (`0.0.0.0:P` or
/// `[::]:P`) becomes one dual-stack IPv6 socket, so the node reaches and is
/// reached over both IPv4 and IPv6 (mDNS often reports IPv6 first); where
/// the host has no IPv6, `0.0.0.0:P` stays IPv4. A specific address binds
/// just that family.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    if addr.ip().is_unspecified() {
        let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
        // Only a host without IPv6 (the socket cannot be made, or cannot
        // be dual-stack) falls back to IPv4; any other error (the port in
        // use) is reported.
        let dual = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .and_then(|s| s.set_only_v6(false).map(|()| s));
        match dual {
            Ok(s) => {
                s.bind(&v6.into())?;
                s.set_nonblocking(true)?;
                return Ok(std::net::UdpSocket::from(s));
            }
            Err(e) if addr.is_ipv6() => return Err(e),
            Err(_) => {} // no IPv6 here: IPv4 only
        }
    }
    std::net::UdpSocket::bind(addr)
}

/// Closes a connection whose message was only partly written.
struct Unfinished<'a>(Option<&'a QuicConnection>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.0 {
            conn.closed.store(true, Ordering::Relaxed);
            conn.conn
                .close(VarInt::from(CLOSED), b"a send was cancelled mid-message");
        }
    }
}

/// Dropping a connection closes it like [`Connection::close`]: messages
/// already sent are still delivered.
impl Drop for QuicConnection {
    fn drop(&mut self) {
        self.close_gracefully();
    }
}

/// The quinn configurations this transport uses, for measuring it against
/// raw quinn with the same TLS and transport settings (feature `test-utils`).
#[cfg(feature = "test-utils")]
pub mod raw {
    use super::*;

    /// A server configuration presenting `key` and accepting any node key,
    /// which lets the client open one stream.
    pub fn server_config(
        key: Arc<NodeKey>,
        config: &QuicConfig,
    ) -> Result<quinn::ServerConfig, TransportError> {
        let tls = Tls::new(key)?;
        let protocols = [Protocol::PAIRING, Protocol::MESH];
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls.server(&protocols)?));
        server.transport_config(Arc::new(config.transport(false, 1)?));
        Ok(server)
    }

    /// A client configuration presenting `key` and pinning `expected`.
    pub fn client_config(
        key: Arc<NodeKey>,
        expected: NodeId,
        protocol: Protocol,
        config: &QuicConfig,
    ) -> Result<quinn::ClientConfig, TransportError> {
        let (crypto, _) = Tls::new(key)?.client(expected, protocol)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(config.transport(false, 1)?));
        Ok(client)
    }

    /// The server name clients send.
    pub const SERVER_NAME: &str = super::SERVER_NAME;
}

#[cfg(test)]
mod tests;

//! The WebSocket gateway of a primary (R-TRAN4): JSON-RPC 2.0 over a
//! WebSocket at `/rpc`, the dashboard at `/`, `GET /healthz`.
//!
//! ```text
//! → {"jsonrpc":"2.0","id":1,"method":"auth.login","params":{"token":"…"}}
//! ← {"jsonrpc":"2.0","id":1,"result":{"principal":"admin"}}
//! → {"jsonrpc":"2.0","id":2,"method":"events.subscribe","params":{"patterns":["device.*"]}}
//! ← {"jsonrpc":"2.0","id":2,"result":{"subscriptionId":"s1"}}
//! ← {"jsonrpc":"2.0","method":"event","params":{"subscriptionId":"s1","type":"device.online","at":…,"data":{…}}}
//! ```
//!
//! **Principals.** The dashboard's user holds the admin token (made on first
//! start in `DATA_DIR/admin.token`, mode 0600; only its hash is kept in
//! memory; [`Gateway::rotate_admin_token`]). Web remotes are devices of
//! platform `web`: an anonymous socket asks with `devices.request_pairing`,
//! shows the `requestCode` it gets, the user approves at the dashboard by
//! typing that code (`devices.approve_pairing {requestId, code}`), and the
//! socket receives its device token in a `pairing.approved` notification.
//! The token goes in `auth.login` or an `Authorization: Bearer` header on
//! the upgrade — never in the URL. Every call is checked by one function
//! (`methods::authorize`): the admin token may do everything; a web
//! remote's token is checked through the registry's gate at each call
//! (revocation and rotation act at once) against the scope the method
//! needs, and its sockets close (1008) within a second of a revocation,
//! unpairing or new token.
//!
//! How this differs from the pairing of devices with node keys: there the
//! 6-digit code is a PAKE password, so nobody on the network learns the
//! token or can sit in the middle; here the code only proves the request
//! on the dashboard is the one on the screen in front of the user. The
//! channel protects the token: the gateway listens on loopback, or with TLS
//! (`GatewayConfig::tls`), unless the operator says `insecure`.
//!
//! **Errors** (JSON-RPC codes): -32700 parse error, -32600 invalid request,
//! -32601 method not found, -32602 invalid params (`data.field` names the
//! field), and -32001 unauthorized, -32002 forbidden (`data.scope`), -32003
//! not found, -32004 policy denied (`data.code`), -32010 pairing expired,
//! -32011 invalid code (`data.attemptsLeft`), -32012 already paired,
//! -32013 rejected, -32020 unavailable (the device is offline or did not
//! answer), -32029 busy (limits), -32603 internal. A message over 1 MiB
//! closes the socket with 1009. A slow subscriber's events are dropped;
//! the subscription's next event that fits follows `event.lagged
//! {subscriptionId, missed}`; the node never waits for it.

mod assets;
mod auth;
mod methods;
pub mod rpc;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::node::Primary;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub use auth::AdminToken;
pub use server::MAX_MESSAGE;

/// The admin token's file name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Certificate chain and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How the gateway listens.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Where to listen (default 127.0.0.1:8080).
    pub addr: SocketAddr,
    /// TLS; required beyond loopback unless `insecure`.
    pub tls: Option<TlsFiles>,
    /// Allow plain HTTP beyond loopback (the token then crosses the network
    /// in the clear).
    pub insecure: bool,
    /// The admin token's file.
    pub admin_token: PathBuf,
    /// Origins allowed besides the page's own (e.g. `http://localhost:3000`).
    pub allowed_origins: Vec<String>,
    /// Sockets open at once from one address (default 64).
    pub max_per_address: usize,
    /// Sockets open at once in all (default 4,096).
    pub max_connections: usize,
    /// The primary's display name, for the dashboard.
    pub primary_name: String,
    /// The one-line command that starts a worker against this primary, for
    /// the dashboard's "add a device" panel.
    pub worker_command: Option<String>,
}

impl GatewayConfig {
    /// Listening on `addr`, the admin token in `data_dir/admin.token`.
    pub fn new(addr: SocketAddr, data_dir: &std::path::Path) -> Self {
        GatewayConfig {
            addr,
            tls: None,
            insecure: false,
            admin_token: data_dir.join(ADMIN_TOKEN_FILE),
            allowed_origins: Vec::new(),
            max_per_address: 64,
            max_connections: 4096,
            primary_name: "mesh primary".into(),
            worker_command: None,
        }
    }

    /// With TLS from these PEM files.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Allows plain HTTP beyond loopback.
    pub fn insecure(mut self, yes: bool) -> Self {
        self.insecure = yes;
        self
    }

    /// Also allows these origins.
    pub fn allowed_origins(mut self, origins: Vec<String>) -> Self {
        self.allowed_origins = origins;
        self
    }

    /// Connection limits: per address and in all.
    pub fn limits(mut self, per_address: usize, total: usize) -> Self {
        self.max_per_address = per_address.max(1);
        self.max_connections = total.max(1);
        self
    }

    /// The dashboard's texts: the primary's name and the worker command.
    pub fn dashboard(mut self, primary_name: &str, worker_command: Option<String>) -> Self {
        self.primary_name = primary_name.to_owned();
        self.worker_command = worker_command;
        self
    }
}

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Beyond loopback without TLS and without `insecure`.
    #[error(
        "the gateway would listen on {0}, beyond loopback, without TLS: give a certificate and key (--gateway-tls CERT KEY), or --gateway-insecure"
    )]
    TlsRequired(SocketAddr),
    /// The certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// Listening or the admin token file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running gateway; dropping it (or [`Gateway::shutdown`]) stops it.
#[derive(Debug)]
pub struct Gateway {
    local: SocketAddr,
    shared: Arc<server::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for server::Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts serving `primary` as `config` says (inside a tokio runtime).
    pub async fn start(primary: Primary, config: GatewayConfig) -> Result<Gateway, GatewayError> {
        if !config.addr.ip().is_loopback() && config.tls.is_none() && !config.insecure {
            return Err(GatewayError::TlsRequired(config.addr));
        }
        let tls = match &config.tls {
            Some(files) => Some(tls_acceptor(files)?),
            None => None,
        };
        let admin_path = config.admin_token.clone();
        let admin = tokio::task::spawn_blocking(move || AdminToken::load_or_create(&admin_path))
            .await
            .map_err(|e| GatewayError::Io(std::io::Error::other(e)))??;
        let listener = TcpListener::bind(config.addr).await?;
        let local = listener.local_addr()?;
        let (shared, app) = server::router(primary, admin, config, local);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut tasks = Vec::new();
        if let Some(w) = server::watch_devices(&shared) {
            tasks.push(w);
        }
        let service = app.into_make_service_with_connect_info::<server::ClientAddr>();
        let serving = match tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, service)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            }),
            Some(acceptor) => {
                let tls_listener = TlsListener::new(listener, acceptor);
                tokio::spawn(async move {
                    let _ = axum::serve(tls_listener, service)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await;
                })
            }
        };
        tasks.push(serving);
        Ok(Gateway {
            local,
            shared,
            stop: Some(stop),
            tasks,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Makes a new admin token (written to its file; the old one stops
    /// working and its sockets close); returns it.
    pub fn rotate_admin_token(&self) -> std::io::Result<zeroize::Zeroizing<String>> {
        let token = self.shared.admin.rotate()?;
        self.shared.close_admins();
        Ok(token)
    }

    /// A socket inside this process, as the admin (`admin`) or anonymous:
    /// messages go through the same parsing, access check and methods as
    /// a WebSocket's, without the network (the fuzz target drives it).
    pub fn local_socket(&self, admin: bool) -> LocalSocket {
        let principal = if admin {
            auth::Principal::Admin {
                generation: self.shared.admin.generation(),
            }
        } else {
            auth::Principal::Anonymous
        };
        LocalSocket {
            shared: self.shared.clone(),
            socket: self.shared.local_socket(principal),
        }
    }

    /// Stops listening and closes every socket.
    pub async fn shutdown(mut self) {
        self.stop_now();
        for t in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }

    fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.shared.close_all();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_now();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// See [`Gateway::local_socket`].
pub struct LocalSocket {
    shared: Arc<server::Shared>,
    socket: Arc<server::Socket>,
}

impl std::fmt::Debug for LocalSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSocket").finish_non_exhaustive()
    }
}

impl LocalSocket {
    /// Handles one message as a WebSocket text message: the answer
    /// (`None` for notifications only).
    pub async fn message(&self, text: &str) -> Option<String> {
        if text.len() > MAX_MESSAGE {
            return None;
        }
        server::answer(&self.shared, &self.socket, text)
            .await
            .map(|v| v.to_string())
    }
}

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, GatewayError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(GatewayError::Tls(format!(
            "{}: no certificate in it",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| GatewayError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| GatewayError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections and finishes their TLS handshakes in tasks of
/// their own (10 s each at most), so a slow handshake holds up nobody.
struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    _accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        TlsListener {
            local,
            ready,
            _accepting: accepting,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self._accepting.abort();
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>>
    for server::ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        server::ClientAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for server::ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        server::ClientAddr(*stream.remote_addr())
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Some(c) = self.ready.recv().await {
                return c;
            }
            // The accepting task ended: nothing more will come.
            std::future::pending::<()>().await;
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

//! The server's listening socket, with a bound on open connections. Every
//! open connection holds a file descriptor and a little memory whether or
//! not it ever sends a request; without a bound, clients that open
//! connections and send nothing (or a header a byte a minute) could take
//! every descriptor the process may have, and then nobody's requests
//! would be accepted, the database's connections included. At the bound
//! the server stops accepting until a connection closes; new ones wait in
//! the kernel's backlog meanwhile.
//!
//! A connection must also send each request's headers, and may sit idle
//! between requests, only for so long ([`serve`]): otherwise a client
//! sending a header a byte a minute holds a slot for ever, and enough of
//! them take every slot.
//!
//! It also says who the client is ([`Peer`], and [`client_ip`] behind
//! trusted proxies), for capture's `$ip` and for `/metrics`' allow list.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request};
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// Descriptors kept back from connections, for the database, the data
/// files and the plugins' outgoing requests.
const KEPT_BACK: u64 = 256;

/// The most connections the process can hold open: half of what is left
/// of its descriptor limit once [`KEPT_BACK`] are set aside, and at most
/// 10,000.
pub fn default_max_connections() -> usize {
    let limit = descriptor_limit().unwrap_or(1024);
    (limit.saturating_sub(KEPT_BACK) / 2).clamp(16, 10_000) as usize
}

fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0).then_some(limit.rlim_cur)
}

/// A TCP listener that keeps at most a given number of connections open.
pub struct Limited {
    listener: TcpListener,
    open: Arc<Semaphore>,
}

impl Limited {
    pub fn new(listener: TcpListener, max_connections: usize) -> Limited {
        Limited {
            listener,
            open: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }
}

impl Listener for Limited {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        let slot = self
            .open
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (stream, addr) = Listener::accept(&mut self.listener).await;
        (
            Connection {
                stream,
                _slot: slot,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Serves `app` over HTTP/1.1 on `listener` until `shutdown`, then stops
/// accepting and waits for the requests in flight. Each request carries
/// [`ConnectInfo`]`<`[`Peer`]`>`. A connection that takes longer than
/// `header_timeout` to send a request's headers, or stays idle that long
/// between requests, is closed.
pub async fn serve(
    mut listener: Limited,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (connection, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = app
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(Peer(peer)));
                request
            });
        let served = graceful.watch(
            http.serve_connection(TokioIo::new(connection), TowerToHyperService::new(service)),
        );
        tokio::spawn(async move {
            if let Err(err) = served.await {
                tracing::debug!(%peer, "connection closed: {err}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// An accepted connection; its slot is given back when it closes.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The client's address, which capture records as `$ip`.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The client's address: the peer's, unless the peer is a trusted proxy;
/// then the nearest `X-Forwarded-For` address that is not one, read from
/// the right, since each proxy appends the address it heard from and
/// everything left of the first untrusted one may have been written by
/// the client.
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, trusted: &[ipnet::IpNet]) -> String {
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|net| net.contains(&ip));
    if !is_trusted(peer.ip()) {
        return peer.ip().to_string();
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .collect();
    for hop in forwarded.iter().rev() {
        match hop.parse::<std::net::IpAddr>() {
            Ok(ip) if is_trusted(ip) => continue,
            _ => return hop.to_string(),
        }
    }
    forwarded
        .first()
        .map_or_else(|| peer.ip().to_string(), |first| first.to_string())
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    #[tokio::test]
    async fn past_the_bound_accepting_waits_until_a_connection_closes() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut limited = Limited::new(tcp, 2);
        let clients: Vec<TcpStream> = connect_clients(addr, 3).await;
        let (first, _) = limited.accept().await;
        let (_second, _) = limited.accept().await;

        let mut third = std::pin::pin!(limited.accept());
        let waiting = std::future::poll_fn(|cx| Poll::Ready(third.as_mut().poll(cx).is_pending()));
        assert!(waiting.await, "a third connection waits while two are open");
        drop(first);
        let (_third, from) = third.await;
        assert_eq!(from, clients[2].local_addr().unwrap());
    }

    async fn connect_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        clients
    }

    #[test]
    fn the_default_leaves_descriptors_for_the_rest_of_the_server() {
        let max = default_max_connections();
        let limit = descriptor_limit().unwrap();
        assert!((16..=10_000).contains(&max), "{max}");
        assert!(
            max as u64 <= limit.saturating_sub(KEPT_BACK).max(32),
            "{max} of {limit}"
        );
    }

    fn headers(forwarded: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", forwarded.parse().unwrap());
        headers
    }

    fn networks(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn only_a_trusted_proxys_forwarded_address_is_believed() {
        let trusted = networks(&["127.0.0.0/8", "10.0.0.0/8"]);
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.5:5000".parse().unwrap();
        assert_eq!(
            client_ip(&headers("1.2.3.4"), stranger, &trusted),
            "203.0.113.5"
        );
        assert_eq!(client_ip(&headers("1.2.3.4"), proxy, &trusted), "1.2.3.4");
        // The client wrote 6.6.6.6 itself; the proxies appended the rest.
        assert_eq!(
            client_ip(&headers("6.6.6.6, 1.2.3.4, 10.0.0.2"), proxy, &trusted),
            "1.2.3.4"
        );
        assert_eq!(client_ip(&headers("10.0.0.2"), proxy, &trusted), "10.0.0.2");
        assert_eq!(client_ip(&HeaderMap::new(), proxy, &trusted), "127.0.0.1");
    }
}

//! The server's listening socket, with a bound on open connections. Every
//! open connection holds a file descriptor and a little memory whether or
//! not it ever sends a request; without a bound, clients that open
//! connections and send nothing (or a header a byte a minute) could take
//! every descriptor the process may have, and then nobody's requests
//! would be accepted, the database's connections included. At the bound
//! the server stops accepting until a connection closes; new ones wait in
//! the kernel's backlog meanwhile.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

impl Connected<IncomingStream<'_, Limited>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Limited>) -> Self {
        Peer(*stream.remote_addr())
    }
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
}

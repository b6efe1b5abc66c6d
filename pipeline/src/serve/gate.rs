//! The door of the HTTP and Flight SQL listeners: how many connections
//! each holds open, and how long a connection may go without an answer.
//!
//! pgwire counts its connections and gives a peer 15 s to log in
//! (`accept_pg`). HTTP and Flight SQL authenticate each request instead,
//! so a peer that opens sockets and sends nothing, or sends a header a
//! byte at a time, held a file descriptor each for as long as it liked:
//! twenty thousand of them took every descriptor of the process, and
//! pgwire could no longer accept anyone. Here a listener accepts a
//! connection only while it holds fewer than its limit (the rest wait in
//! the kernel's backlog, costing no descriptor), and closes one the
//! server has written nothing to for [`Gate::quiet`]: a request answered
//! restarts the clock, so a keep-alive client between requests, a peer
//! that never completes a request and a silent socket all end there,
//! while a query may run its whole `--query-timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// What one listener admits.
#[derive(Clone)]
pub struct Gate {
    /// Connections open at once (`--max-connections`).
    permits: Arc<Semaphore>,
    /// How long a connection may go without the server writing to it.
    pub quiet: Duration,
}

/// The quiet time a connection gets beyond the query timeout: time to
/// send a request and read its answer.
const QUIET_MARGIN: Duration = Duration::from_secs(15);

impl Gate {
    /// A gate of `max` connections, each closed after the query timeout
    /// and [`QUIET_MARGIN`] without a write.
    pub fn new(max: usize, query_timeout: Duration) -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(max.max(1))),
            quiet: query_timeout + QUIET_MARGIN,
        }
    }

    /// The next connection, once the listener holds fewer than its limit.
    /// Accept errors (out of descriptors and the like) are retried.
    pub async fn accept(&self, listener: &TcpListener) -> (Gated, std::net::SocketAddr) {
        // A closed semaphore never happens (it is never closed); waiting
        // forever is then the right answer.
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(p) => p,
            Err(_) => std::future::pending().await,
        };
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (Gated::new(stream, permit, self.quiet), peer);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// An accepted connection: holds its place under the limit, and fails
/// its reads and writes once the server has written nothing for `quiet`.
pub struct Gated {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    quiet: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Gated {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, quiet: Duration) -> Gated {
        Gated {
            stream,
            _permit: permit,
            quiet,
            deadline: Box::pin(tokio::time::sleep(quiet)),
        }
    }

    /// The socket, for the peer's address.
    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }

    /// `Pending` turned into a timeout error once the deadline passed.
    fn or_quiet<T>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match p {
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection closed: nothing answered on it for too long",
                )))
            }
            other => other,
        }
    }
}

impl Gated {
    /// A write's outcome: bytes written restart the clock.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        p: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = p
            && n > 0
        {
            let next = Instant::now() + self.quiet;
            self.deadline.as_mut().reset(next);
        }
        self.or_quiet(cx, p)
    }
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.or_quiet(cx, p)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.wrote(cx, p)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.stream).poll_flush(cx);
        self.or_quiet(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.wrote(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that sends nothing is closed after `quiet`; the limit holds
    /// the next connection back until a place is free.
    #[tokio::test]
    async fn a_silent_peer_is_closed_and_the_limit_holds() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Gate {
            permits: Arc::new(Semaphore::new(1)),
            quiet: Duration::from_millis(300),
        };
        let _first = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = gate.accept(&listener).await;
        let accepted = std::time::Instant::now();
        let _second = TcpStream::connect(addr).await.unwrap();
        // The second waits while the first holds the only place.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), gate.accept(&listener))
                .await
                .is_err()
        );
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(accepted.elapsed() >= Duration::from_millis(290));
        drop(conn);
        let (mut next, _) = tokio::time::timeout(Duration::from_secs(2), gate.accept(&listener))
            .await
            .unwrap();
        // An answer restarts the clock.
        tokio::time::sleep(Duration::from_millis(200)).await;
        next.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        next.write_all(b"y").await.unwrap();
    }
}

//! The front of the transparent proxy: for each redirected connection, where
//! the agent meant to go ([`orig_dst`]) and what it says first
//! ([`client_hello`]), so the proxy can decide to terminate TLS, splice the
//! bytes through, or refuse. [`Replay`] hands the bytes read while deciding
//! back to whoever handles the connection next.

pub mod client_hello;
pub mod orig_dst;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use client_hello::{
    ClientHello, Peek, PeekTimeouts, PeekVerdict, Peeked, parse_client_hello, peek_client_hello,
};
pub use orig_dst::{OriginalDst, original_dst};

/// Why a redirected connection cannot be handled.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The connection did not come through the redirect.
    #[error("connection to {local} has no original destination ({reason}); it was not redirected")]
    NoOriginalDst { local: SocketAddr, reason: String },
    /// The original destination is the sidecar's own listener: dialling it
    /// would loop.
    #[error("connection's original destination {dst} is the sidecar's own listener (a loop)")]
    Loop { dst: SocketAddr },
    #[error("{what}: {reason}")]
    Socket { what: &'static str, reason: String },
}

/// A stream that first yields bytes already read from it (a peeked
/// ClientHello), then reads from the stream itself; writes go straight to
/// the stream. Wrap the accepted connection in it before a TLS acceptor or a
/// splice.
#[derive(Debug)]
pub struct Replay<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Replay<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            offset: 0,
            inner,
        }
    }

    /// The bytes not yet replayed.
    pub fn pending(&self) -> &[u8] {
        self.prefix.get(self.offset..).unwrap_or_default()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream and the bytes not yet replayed.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let mut prefix = self.prefix;
        prefix.drain(..self.offset.min(prefix.len()));
        (self.inner, prefix)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let pending = this.prefix.get(this.offset..).unwrap_or_default();
        if !pending.is_empty() {
            let n = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..n]);
            this.offset += n;
            if this.offset == this.prefix.len() {
                // Replayed: give the memory back for the connection's life.
                this.prefix = Vec::new();
                this.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn replay_yields_the_peeked_bytes_then_the_stream() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut replay = Replay::new(b"hello".to_vec(), server);
        let mut small = [0u8; 3];
        replay.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        assert_eq!(replay.pending(), b"lo");
        let mut rest = String::new();
        replay.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "lo world");
        assert!(replay.pending().is_empty());
    }

    #[tokio::test]
    async fn replay_writes_go_to_the_stream() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut replay = Replay::new(Vec::new(), server);
        replay.write_all(b"reply").await.unwrap();
        replay.flush().await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply");
        let (_, rest) = replay.into_parts();
        assert!(rest.is_empty());
    }
}

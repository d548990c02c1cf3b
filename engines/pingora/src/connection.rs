//! A client connection with a write buffer, as pingora-core's HTTP/1.1 server code expects.
//!
//! pingora-core writes a response head and each piece of its body with calls of their own and
//! flushes where the client must see the bytes: after a head without a body or without a
//! `Content-Length` (a stream), after every chunk of a chunked body, at the end of a body. A
//! connection from Pingora's own listener has a write buffer underneath for that reason
//! (`L4BufferSettings`, 1,460 bytes); a `Stream` made from a tokio `TcpStream`, which is what
//! this host gets from the caller's listener, has none and cannot be given one (pingora-core
//! keeps `set_buffer` to itself). Unbuffered, a JSON response left in two `sendto` calls (head,
//! body) where the hyper host makes one `writev`: strace on the bare hop counted four writes per
//! request against hyper's two (the other extra one is pingora-core's client, which flushes a
//! request head before its body). [`Buffered`] puts a [`BufWriter`] between the two and hands
//! every other question (digests, peeking for the h2c preface, shutdown) to the stream.
//!
//! The buffer is allocated with the connection; 4 KiB holds the head and body of a typical
//! non-streamed completion, and a larger body goes past it without a copy.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, TimingDigest, UniqueID,
    UniqueIDType, l4::stream::Stream, raw_connect::ProxyDigest,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

/// Bytes a connection buffers before a write goes out (see the module doc).
const WRITE_BUFFER: usize = 4096;

/// A client connection whose writes are buffered until pingora-core flushes.
#[derive(Debug)]
pub(crate) struct Buffered(BufWriter<Stream>);

impl From<tokio::net::TcpStream> for Buffered {
    fn from(stream: tokio::net::TcpStream) -> Self {
        Self(BufWriter::with_capacity(WRITE_BUFFER, Stream::from(stream)))
    }
}

// === impl Buffered: I/O ===

impl AsyncRead for Buffered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        // What is still buffered goes first; a client that left has nothing to receive.
        let _ = self.0.flush().await;
        Shutdown::shutdown(self.0.get_mut()).await;
    }
}

#[async_trait::async_trait]
impl Peek for Buffered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

// === impl Buffered: what pingora-core asks of a connection ===

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.0.get_ref().id()
    }
}

impl Ssl for Buffered {}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.0.get_ref().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.0.get_ref().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.0.get_ref().get_write_pending_time()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.0.get_ref().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.get_mut().set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.0.get_ref().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.0.get_mut().set_socket_digest(digest);
    }
}

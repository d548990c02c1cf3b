//! The hyper host: `hyper-util`'s auto server (HTTP/1.1 and h2c) with graceful shutdown.
//!
//! On shutdown it stops accepting, lets in-flight requests and streams finish for up to the
//! drain timeout, then closes what is left.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use llmgate_core::{GatewayBody, body, body::HostedService};
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;

/// Serves `service` on `listener` until `shutdown` resolves, then drains for up to `drain`.
///
/// Any clonable Tower service over [`GatewayBody`] that never fails can be served (errors are
/// the stack's to render, e.g. with `llmgate_core::RescueLayer`); each connection gets a clone.
/// Returns once every connection has finished or the drain timeout passed.
pub async fn serve<S>(listener: TcpListener, service: S, shutdown: impl Future<Output = ()>, drain: Duration)
where
    S: HostedService,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| call(&service, req));
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests for up to {:?}", drain);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout passed; closing the remaining connections");
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

/// Calls the stack with the body boxed. The boxed future erases the body's error type before
/// `tokio::spawn` checks `Send` (which otherwise trips over the `dyn Error` lifetime).
fn call<S>(service: &S, req: Request<Incoming>) -> ResponseFuture
where
    S: HostedService,
{
    Box::pin(service.clone().oneshot(req.map(body::boxed)))
}

/// The listen backlog: with the default (1,024) a burst of thousands of new connections overflows
/// the accept queue and the dropped SYNs come back only after a 1 s retransmit.
const BACKLOG: u32 = 8192;

/// Binds `addr` (port 0 picks a free port), with `SO_REUSEADDR` (a restart does not wait for
/// the old connections' TIME_WAIT) and a deep backlog.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

//! A custom stack over the Pingora upstream, hosted by a pingora-core server.
//!
//! Reads JSON chat bodies once (1 MiB limit), tags each response with the engine that served it,
//! logs usage when a body ends, and renders errors as OpenAI JSON. SSE streams pass unbuffered.
//!
//! ```sh
//! cargo run -p llmgate-pingora --example pingora_proxy -- http://127.0.0.1:4010/v1
//! ```

use std::time::Duration;

use http::{HeaderValue, Response};
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, RescueLayer,
    ext::{UpstreamMode, UpstreamTarget},
    usage,
};
use llmgate_pingora::{PingoraUpstream, serve_pingora};
use tower::{ServiceBuilder, util::BoxCloneService};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let base_url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:4010/v1".into());
    let target =
        UpstreamTarget { name: "mock".into(), base_url: base_url.into(), mode: UpstreamMode::OpenAi, api_key: None };
    let upstream = PingoraUpstream::builder(target).timeout(Duration::from_secs(30)).build();

    let stack = ServiceBuilder::new()
        .layer(RescueLayer::new())
        .map_response(|mut response: Response<GatewayBody>| {
            response.headers_mut().insert("x-served-by", HeaderValue::from_static("pingora"));
            usage::tap(&mut response, 0)
                .subscribe(|outcome| println!("usage: {:?} ({:?})", outcome.usage, outcome.end));
            response
        })
        .layer(DecodeJsonLayer::new().limit(1024 * 1024))
        .layer(EncodeJsonLayer::new())
        .service(upstream);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:4002").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve_pingora(listener, BoxCloneService::new(stack), shutdown, Duration::from_secs(10)).await;
    Ok(())
}

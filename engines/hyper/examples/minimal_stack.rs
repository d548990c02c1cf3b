//! A custom stack from the core pieces over the hyper upstream, served by hyper.
//!
//! Reads JSON chat bodies once (1 MiB limit), pins every request to one model, logs the usage of
//! each response when its body ends, and renders errors as OpenAI JSON.
//!
//! ```sh
//! cargo run -p llmgate-hyper --example minimal_stack -- http://127.0.0.1:4010/v1
//! ```

use std::time::Duration;

use http::{Request, Response};
use llmgate_core::{
    BoxError, DecodeJsonLayer, EncodeJsonLayer, GatewayBody, RescueLayer,
    ext::{BodyEdits, EditScope, UpstreamMode, UpstreamTarget},
    usage,
};
use llmgate_hyper::HyperUpstream;
use tower::{ServiceBuilder, ServiceExt, util::BoxCloneService};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let base_url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:4010/v1".into());
    let target =
        UpstreamTarget { name: "mock".into(), base_url: base_url.into(), mode: UpstreamMode::OpenAi, api_key: None };
    let upstream = HyperUpstream::new(target, Duration::from_secs(30));

    let stack = ServiceBuilder::new()
        .layer(RescueLayer::new())
        .layer(DecodeJsonLayer::new().limit(1024 * 1024))
        // A layer of your own: pin the model (the encoder applies the edit once, per attempt).
        .map_request(|mut req: Request<GatewayBody>| {
            let mut edits = BodyEdits::default();
            edits.set("model", "gpt-4o-mini".into(), EditScope::Always);
            req.extensions_mut().insert(edits);
            req
        })
        .map_response(|mut response: Response<GatewayBody>| {
            usage::tap(&mut response, 0)
                .subscribe(|outcome| println!("usage: {:?} ({:?})", outcome.usage, outcome.end));
            response
        })
        .layer(EncodeJsonLayer::new())
        .service(upstream);
    let service = BoxCloneService::new(stack.map_request(|req: Request<GatewayBody>| req));

    let listener = llmgate_hyper::bind("127.0.0.1:4001".parse()?).await?;
    println!("listening on http://{}", listener.local_addr()?);
    llmgate_hyper::serve(
        listener,
        service,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
        Duration::from_secs(10),
    )
    .await;
    Ok(())
}

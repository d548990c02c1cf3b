//! The one integration-test binary: the reference proxy and the mock upstream in-process on
//! ephemeral ports, real sockets, a real HTTP client, real redis-server processes.
#![allow(unreachable_pub)]

mod fallback;
mod langfuse;
mod metadata;
mod proxy;
mod routing;
mod support;

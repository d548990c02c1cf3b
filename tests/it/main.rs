//! The one integration-test binary: the reference proxy and the mock upstream in-process on
#![allow(unreachable_pub)]
//! ephemeral ports, real sockets, a real HTTP client, real redis-server processes.

mod proxy;
mod support;

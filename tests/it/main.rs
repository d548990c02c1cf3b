//! The one integration-test binary: the reference proxy and the mock upstream in-process on
//! ephemeral ports, real sockets, a real HTTP client, real redis-server processes.
#![allow(unreachable_pub)]

mod bad_input;
mod config_prop;
mod deploy;
mod engines;
mod fallback;
mod faults;
mod langfuse;
mod metadata;
mod metrics;
mod operations;
mod proxy;
mod reload;
mod report;
mod rollout_logs;
mod routing;
mod secrets;
mod security;
mod support;
mod tls;
mod traces;
mod warm_start;

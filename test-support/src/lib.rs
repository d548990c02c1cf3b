//! Test harness pieces shared by llmgate's test suites. Not part of the product.
//!
//! - [`redis`]: real `redis-server` processes (single node or a cluster) on ephemeral loopback
//!   ports, killed when dropped.
//! - [`body`]: scripted response bodies and the `size_hint` checker every body's property test
//!   uses.
//! - [`langfuse`]: a Langfuse stand-in (OTLP ingestion, v3/v4 read endpoints, fault switches).
#![allow(unreachable_pub, missing_docs)]

pub mod body;
pub mod langfuse;
pub mod redis;

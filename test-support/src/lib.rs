//! Test harness pieces shared by llmgate's test suites. Not part of the product.
//!
//! - [`redis`]: real `redis-server` processes (single node or a cluster) on ephemeral loopback
//!   ports, killed when dropped.
//! - [`langfuse`]: a Langfuse stand-in (OTLP ingestion, v3/v4 read endpoints, fault switches).
#![allow(unreachable_pub, missing_docs)]

pub mod langfuse;
pub mod redis;

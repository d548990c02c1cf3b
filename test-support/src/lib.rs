//! Test harness pieces shared by llmgate's test suites. Not part of the product.
//!
//! - [`redis`]: real `redis-server` processes (single node or a cluster) on ephemeral loopback
//!   ports, killed when dropped.
#![allow(unreachable_pub, missing_docs)]

pub mod redis;

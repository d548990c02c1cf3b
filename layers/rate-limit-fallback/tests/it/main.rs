//! Crate-level tests: the shared store suite (memory and Redis), Redis specifics (shared
//! budget across connections, Cluster, outages), and the layer against `service_fn` upstreams.

mod layer;
mod lease;
mod redis;
mod suite;

//! Hosts: serve a stack on a socket.

pub mod hyper;
#[cfg(feature = "pingora")]
pub mod pingora;

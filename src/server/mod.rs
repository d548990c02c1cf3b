//! Hosts: serve a stack on a socket.

pub mod hyper;

//! Nodes in one process, talking over loopback TCP and mutual TLS with real sled stores: join,
//! replication through the transport, promotion, removal, and refusals of bad peers.

mod identity;
mod peers;

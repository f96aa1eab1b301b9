//! Tests of the Raft node: one node on real sled storage (`node`), and clusters of cores on a
//! simulated network (`cluster`).

mod cluster;
mod node;

//! The peers benchmark (`cargo xtask bench --peers`, `tests/benches/peers.rs`): lb against the
//! balancers a user would pick instead, on one namespace topology, in one run.
//!
//! - [`load`]: the backends' TCP and UDP servers, and the load generators (short TCP
//!   connections, one bulk TCP stream, a UDP blaster), every loop bounded in count and time;
//! - [`peers`]: starting and stopping each configuration in the `lb` namespace: the direct path
//!   (no balancer), lb, kernel DNAT (nftables with conntrack), HAProxy, nginx stream;
//! - [`stats`]: medians, percentiles, CPU time from `/proc/stat`;
//! - [`svg`]: the plot of the results, written without external tools.
pub mod load;
pub mod peers;
pub mod stats;
pub mod svg;

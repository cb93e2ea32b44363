//! The harness shared by lb's integration tests and by `cargo xtask demo`.
//!
//! Tests run real programs on real sockets, each in network namespaces of its own:
//! - [`netns`]: creating and deleting namespaces with names unique to the process and the
//!   test (tests run in parallel), running commands and closures inside one, and
//!   [`cleanup_all`] for a Ctrl-C handler;
//! - [`topology`]: namespaces joined by veth pairs, and the standard balancer layout
//!   (client → lb → backend1/backend2) with its addresses;
//! - [`daemon`]: `lb-daemon` as a child process in a namespace: readiness, SIGTERM, stderr;
//! - [`echo`]: TCP echo servers in the backends and the matching client exchange;
//! - [`audit`]: the decoded audit log (`lb-audit read DIR --format json`) and temporary dirs;
//! - [`packet`]: crafting and checking frames for the BPF_PROG_TEST_RUN packet tests;
//! - [`bench`]: servers, load generators and peer balancers of the peers benchmark.
//!
//! Everything that creates something removes it in `Drop`, so a failing assertion (a panic)
//! still leaves no namespace or process behind. Tests that need root call [`require_root`]
//! first and return when it says no.
pub mod audit;
pub mod bench;
pub mod daemon;
pub mod echo;
pub mod netns;
pub mod packet;
pub mod topology;

pub use audit::{TempDir, read_audit};
pub use daemon::{Daemon, bin, bin_dir};
pub use echo::{EchoServer, Exchange, echo_exchange};
pub use netns::{Netns, cleanup_all, in_netns, is_root, require_root, spawn_in_netns};
pub use topology::Topology;

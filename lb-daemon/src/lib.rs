//! lb: an L4 load balancer whose data plane is an XDP program and whose promise is a complete,
//! verifiable audit trail.
//!
//! Modules, one per concern:
//! - [`config`]: command-line flags and the effective configuration;
//! - [`cli`]: the command lines of `lbctl` and `lb-audit` (for man pages and completions too);
//! - [`balancer`]: service/backend placement and the weighted Maglev table;
//! - [`control`]: the control socket: caller identity (SO_PEERCRED), roles, requests;
//! - [`requests`]: executing control requests: queries, and changes recorded before applied;
//! - [`dataplane`]: loading the eBPF object, writing its maps, reading flows and records;
//! - [`export`]: shipping the audit log to a collector, at least once;
//! - [`health`]: active TCP/UDP/HTTP checks with rise/fall;
//! - [`history`]: the configuration at any moment, rebuilt from the log's records;
//! - [`metrics`]: the Prometheus endpoint;
//! - [`neighbors`]: keeping backends' link-layer addresses resolved for the XDP FIB lookup;
//! - [`notify`]: the systemd readiness protocol;
//! - [`daemon`]: the run loop tying kernel records to the audit log;
//! - [`journal`]: writing the audit log under the failure policy (fail-open / fail-closed);
//! - [`alerts`]: monitoring rules on the live record stream;
//! - [`blocks`]: refusing, for a while, the sources alerts name (`--alert-block`);
//! - [`audit`]: the binary, tamper-evident log and its reader.
pub mod alerts;
pub mod audit;
pub mod balancer;
pub mod blocks;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod export;
pub mod flow_table;
pub mod health;
pub mod history;
pub mod journal;
mod mapping;
pub mod metrics;
pub mod neighbors;
pub mod notify;
pub mod requests;

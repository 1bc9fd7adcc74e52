//! The `lb-agent` library: config sources, the desired-state model, map contents and their
//! diff, and the data plane handle. `main.rs` is the command line on top.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod http;
pub mod ipam;
pub mod kubernetes;
pub mod logging;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod netif;
pub mod pins;
pub mod podif;
pub mod record;
pub mod report;
pub mod watch;

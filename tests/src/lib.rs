//! Shared pieces of the integration tests and the demo: a typed frame builder for
//! `BPF_PROG_TEST_RUN` tables, network namespaces that delete themselves, and runners for the
//! agent and the probe inside them.

pub mod agent;
pub mod cluster;
pub mod demo;
pub mod fake_api;
pub mod frame;
pub mod image;
pub mod netns;
pub mod probe;

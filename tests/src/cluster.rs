//! The multi-node topology of the Service-semantics tests.

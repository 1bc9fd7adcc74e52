//! Maglev consistent hashing: the lookup table every node builds identically.

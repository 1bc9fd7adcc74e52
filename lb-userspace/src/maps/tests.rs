//! Tests of the map plan.

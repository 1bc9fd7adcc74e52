//! Pod interfaces (`--pod-iface`): which host-side interfaces match, and when the set changes.

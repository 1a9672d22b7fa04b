//! `tether-edge`, the edge server: listeners, policy, routing to device
//! sessions, the token store, the admin API and events.
//!
//! Skeleton: filled by the end-to-end issue on top of `tether-proto` and
//! `tether-driver`.

//! `tetherd`, the device daemon: config, credential file, the TLS dialer with
//! reconnect, upstream connections and systemd integration.
//!
//! Skeleton: the tunnel itself arrives with the end-to-end issue; the
//! multiplexer and its async driver it will use are `tether-proto` and
//! `tether-driver`.

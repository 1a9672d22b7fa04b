//! End-to-end tests that run the real binaries on loopback (filled by the
//! end-to-end issue).

//! Shared code of the `tether-proto` fuzz targets.
//!
//! The operation model of the `mux_ops` target lives here (not in the target
//! file) so that `examples/gen_corpus.rs` can build seed inputs from the same
//! types and check that they decode back to the intended operations. The
//! targets themselves are in `fuzz_targets/`; this crate is not part of the
//! main workspace and builds on nightly with `cargo fuzz`.

pub mod mux_ops;

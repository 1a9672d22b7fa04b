//! Fuzzes sequences of multiplexer operations: one server-role mux fed
//! arbitrary bytes, or a client and a server paired over mutable in-memory
//! wires. The model and the invariants are in `src/mux_ops.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto_fuzz::mux_ops::{run, Input};

fuzz_target!(|input: Input| run(input));

//! The per-request stream header from a hostile peer.
//! The body is `pbx_remote::fuzzing::stream_header`, which `cargo test` also replays over
//! `fuzz/corpus/stream_header/` and `fuzz/artifacts/stream_header/`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pbx_remote::fuzzing::stream_header(data));

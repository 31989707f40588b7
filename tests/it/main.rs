//! The integration tests, one binary so `support` compiles once. Each module is one subject;
//! filter by it: `cargo test --test it tunnel::`. The `#[ignore]`d long variants run through
//! `tests/run-long.sh` (faults) and `tests/soak.sh` (soak).

mod support;

mod api;
mod audit_delivery;
mod boundary;
mod browser;
mod cli;
mod console;
mod console_browser;
mod console_pages;
mod enrolment;
mod faults;
mod fuzz_corpus;
mod gate;
mod isolation;
mod memory;
mod operations;
mod portal_login;
mod process;
mod proxy;
mod secrets;
mod sessions;
mod soak;
mod systemd;
mod transport;
mod trust;
mod tunnel;
mod uninstall;

//! The config file: any text is accepted or refused with an error naming the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = pbx_remote::config::AgentConfig::parse(Path::new("/fuzz/agent.toml"), text) {
        assert!(e.0.contains("/fuzz/agent.toml"), "{}", e.0);
    }
});

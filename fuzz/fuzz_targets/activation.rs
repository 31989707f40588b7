//! Activation messages in both directions (the server parses requests, the agent responses).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pbx_remote::protocol::{ActivateRequest, ActivateResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<ActivateRequest>(data) {
        let again = serde_json::to_vec(&req).unwrap();
        serde_json::from_slice::<ActivateRequest>(&again).unwrap();
    }
    let _ = serde_json::from_slice::<ActivateResponse>(data);
    let _ = serde_json::from_slice::<pbx_remote::protocol::ErrorBody>(data);
});

//! The configuration loader: any text gives a configuration or errors with file:line, never a
//! panic (the paths it checks are those of this machine: the text decides).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = baton_core::config::parse_all(std::path::Path::new("/fuzz/baton.yaml"), text);
    }
});

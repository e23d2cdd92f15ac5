//! A self-upgrade's state, as the new program reads it from the old one's memfd.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = baton_core::upgrade::decode(data);
});

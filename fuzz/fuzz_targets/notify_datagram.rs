//! An `sd_notify(3)` datagram on a worker's NOTIFY_SOCKET: any bytes from any process.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = baton_core::master::notices(data);
});

//! The worker channel's packets: what a master reads from a worker, and the manifest and
//! messages a worker reads from its master.
#![no_main]

use baton_proto::{MasterMessage, WorkerMessage, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<WorkerMessage>(data);
    let _ = decode::<MasterMessage>(data);
});

//! The worker channel's packets: what a master reads from a worker, the manifest and messages a
//! worker reads from its master, and the packets of a handoff link (what a taker reads from a
//! giver and back), with a WebSocket's handed-off state.
#![no_main]

use baton_proto::handoff::{LinkMessage, WebSocketState};
use baton_proto::{MasterMessage, WorkerMessage, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<WorkerMessage>(data);
    let _ = decode::<MasterMessage>(data);
    let _ = decode::<LinkMessage>(data);
    let _ = decode::<WebSocketState>(data);
});

//! The control socket's frames, as a master reads a client's and a client a master's: any bytes
//! give a request or a typed error, never a panic.
#![no_main]

use baton_proto::control::{Request, Response, decode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame::<Request>(data);
    let _ = decode_frame::<Response>(data);
});

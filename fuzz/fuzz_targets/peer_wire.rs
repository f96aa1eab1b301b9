//! Bytes from an authenticated peer → the peer protocol's decoders (Raft message batches,
//! snapshot chunks, hello, control requests): never a panic, never an allocation beyond the
//! limits; what decodes re-encodes to what decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linkdns_cluster::wire::{self, Hello, Reassembly, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(messages) = wire::decode_messages(data) {
        let again = wire::decode_messages(&wire::encode_messages(&messages))
            .expect("re-encoded batch decodes");
        assert_eq!(messages, again);
    }
    // Chunks: the input split in two frames.
    let mut r = Reassembly::default();
    let (a, b) = data.split_at(data.len() / 2);
    let _ = r.add(a, wire::MAX_SNAPSHOT);
    let _ = r.add(b, wire::MAX_SNAPSHOT);
    if let Ok(hello) = wire::decode::<Hello>("hello", data) {
        assert_eq!(wire::decode::<Hello>("hello", &wire::encode(&hello)).ok(), Some(hello));
    }
    if let Ok(request) = wire::decode::<Request>("request", data) {
        assert_eq!(
            wire::decode::<Request>("request", &wire::encode(&request)).ok(),
            Some(request)
        );
    }
});

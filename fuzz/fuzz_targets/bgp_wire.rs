//! Bytes from a router (or anything at its address) → the BGP decoder: never a panic; a
//! malformed message names a NOTIFICATION; what decodes re-encodes to what decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linkdns_bgp::wire;

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..wire::HEADER_LEN) {
        let head: &[u8; wire::HEADER_LEN] = head.try_into().expect("19 bytes");
        let _ = wire::header(head);
    }
    for four_octet in [false, true] {
        match wire::decode(data, four_octet) {
            Ok(message) => {
                let again = wire::decode(&wire::encode(&message, four_octet), four_octet)
                    .expect("a decoded message re-encodes to one that decodes");
                assert_eq!(again, message);
            }
            Err(e) => assert!((1..=7).contains(&e.notification.code), "{e}"),
        }
    }
});

//! Bytes → registry command / snapshot decoding: never a panic; whatever decodes re-encodes to
//! something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linkdns_registry::{Command, Registry};

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = Command::decode(data) {
        let again = Command::decode(&command.encode()).expect("re-encoded command decodes");
        assert_eq!(command, again);
        // Applying it to an empty registry never panics either.
        let _ = Registry::new().apply(&command);
    }
    if let Ok(registry) = Registry::restore(data) {
        let bytes = registry.snapshot();
        let again = Registry::restore(&bytes).expect("re-encoded snapshot restores");
        assert_eq!(again.snapshot(), bytes);
    }
});

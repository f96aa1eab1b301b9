//! Bytes → registry command / snapshot decoding: never a panic; whatever decodes re-encodes to
//! something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linkdns_registry::{Command, NodeInfo, Registry};

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = Command::decode(data) {
        let again = Command::decode(&command.encode()).expect("re-encoded command decodes");
        assert_eq!(command, again);
        // Applying it never panics either: to an empty registry, and to one where nodes 1 and 2
        // exist, so commands about them (subnet claims, say) get past the node check.
        let _ = Registry::new().apply(&command);
        let mut registry = Registry::new();
        for id in [1, 2] {
            let node = NodeInfo {
                id,
                name: format!("h{id}"),
                peer_addr: format!("10.0.0.{id}:7380"),
            };
            let _ = registry.apply(&Command::UpsertNode(node));
        }
        let _ = registry.apply(&command);
    }
    if let Ok(registry) = Registry::restore(data) {
        let bytes = registry.snapshot();
        let again = Registry::restore(&bytes).expect("re-encoded snapshot restores");
        assert_eq!(again.snapshot(), bytes);
    }
});

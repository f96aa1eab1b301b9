use linkdns_cluster::{Error, Identity, Token};

#[test]
fn tokens_round_trip_and_bad_ones_say_why() {
    let identity = Identity::bootstrap(1).expect("bootstrap");
    let token = identity.token();
    let text = token.to_string();
    assert!(text.starts_with("LDNS1-"), "{text}");
    assert_eq!(text.parse::<Token>().expect("parse"), token);
    assert_eq!(
        format!("  {text}\n").parse::<Token>().expect("trimmed"),
        token
    );
    for (bad, why) in [
        ("", "LDNS1-"),
        ("SWMTKN-1-abc", "LDNS1-"),
        ("LDNS1-00", "four parts"),
        (&text[..text.len() - 2], "secret"),
        (&text.replacen("LDNS1-", "LDNS1-zz", 1)[..], "cluster id"),
    ] {
        match bad.parse::<Token>() {
            Err(Error::BadToken(reason)) => assert!(reason.contains(why), "{bad:?}: {reason}"),
            other => panic!("{bad:?} parsed: {other:?}"),
        }
    }
    // Two clusters never share a token.
    let other = Identity::bootstrap(1).expect("bootstrap");
    assert_ne!(other.token(), token);
    assert!(!other.secret.matches(&identity.secret));
    assert!(identity.secret.matches(&identity.secret.clone()));
}

#[test]
fn identity_files_round_trip_and_damage_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(Identity::load(dir.path()).expect("no file").is_none());
    let identity = Identity::bootstrap(7).expect("bootstrap");
    identity.save(dir.path()).expect("save");
    let path = dir.path().join(linkdns_cluster::IDENTITY_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
    }
    let loaded = Identity::load(dir.path()).expect("load").expect("present");
    assert_eq!(loaded.node_id, 7);
    assert_eq!(loaded.token(), identity.token());
    assert_eq!(loaded.node_cert, identity.node_cert);

    std::fs::write(&path, b"{\"version\": 1, \"cluster\": \"nothex\"").expect("scribble");
    match Identity::load(dir.path()) {
        Err(e @ Error::DamagedIdentity { .. }) => {
            assert!(e.to_string().contains("cluster.json"), "{e}")
        }
        other => panic!("damaged file accepted: {other:?}"),
    }
}

#[test]
fn concurrent_writers_of_the_identity_file_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::bootstrap(7).expect("bootstrap");
    identity.save(dir.path()).expect("save");
    // Two writers, as `linkdns token --rotate` and the node's own renewal: each changes its
    // own field 100 times, in place, at the same time as the other.
    let path = dir.path().to_path_buf();
    let writers: Vec<_> = (0..2u64)
        .map(|which| {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    Identity::update(&path, |i| {
                        if which == 0 {
                            i.node_cert_since += 1;
                        } else {
                            i.node_cert_expires += 1;
                        }
                    })
                    .expect("update")
                    .expect("present");
                }
            })
        })
        .collect();
    // ... and more writers beside them that change nothing.
    let savers: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    Identity::update(&path, |_| {}).expect("update");
                }
            })
        })
        .collect();
    for t in writers.into_iter().chain(savers) {
        t.join().expect("writer");
    }
    let end = Identity::load(dir.path()).expect("load").expect("present");
    assert_eq!(end.node_cert_since, identity.node_cert_since + 100);
    assert_eq!(end.node_cert_expires, identity.node_cert_expires + 100);
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_retired_identity_keeps_no_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    Identity::bootstrap(3)
        .expect("bootstrap")
        .save(dir.path())
        .expect("save");
    let to = Identity::retire(dir.path(), "removed-1").expect("retire");
    let retired: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&to).expect("read")).expect("JSON");
    assert_eq!(retired["node_key"], "", "{retired}");
    assert_eq!(retired["ca_key"], "", "{retired}");
    assert_eq!(retired["secret"], "0".repeat(64));
    assert!(
        retired["node_cert"].as_str().is_some_and(|c| !c.is_empty()),
        "a record stays"
    );
    assert!(Identity::load(dir.path()).expect("load").is_none());
}

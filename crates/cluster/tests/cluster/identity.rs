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

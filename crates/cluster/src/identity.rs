//! Cluster identity: the cluster id, the join secret and the cluster CA, created at bootstrap;
//! each node's id and certificate, issued by the CA when it joins; the join token.
//!
//! Only voters keep the CA key (the leader, always a voter, admits new nodes and renews
//! certificates): a learner never receives it, a promoted node fetches it from a voter, and a
//! retired node's moved-aside file holds neither it nor the join secret. It lives in
//! `DIR/cluster.json`, mode 0600, written atomically. A node certificate names its node:
//! `node-<id>.<cluster>.linkdns`, plus `member.<cluster>.linkdns`, which a joining node (that
//! knows no node ids yet) checks; it is valid for a limited time (`DEFAULT_CERT_VALIDITY`) and
//! renewed through the leader well before it expires.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Name of the identity file in the data dir.
pub const IDENTITY_FILE: &str = "cluster.json";

/// Prefix of join tokens: format version 1.
const TOKEN_PREFIX: &str = "LDNS1";

/// How long a node certificate is valid: renewed when a third of it is left.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// A certificate's validity starts this far before its issue, for clocks a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// 16 random bytes naming a cluster.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// The join secret. Never printed except inside a token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub [u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A new random secret.
    pub fn random() -> Result<Secret, Error> {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| Error::Crypto("no system randomness".into()))?;
        Ok(Secret(secret))
    }

    /// SHA-256 of the secret: what the log keeps of it.
    pub fn hash(&self) -> [u8; 32] {
        fingerprint(&self.0)
    }

    /// Compares in time independent of where the secrets differ.
    pub fn matches(&self, other: &Secret) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// What a node needs to take part in its cluster, as stored in `DIR/cluster.json`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub cluster: ClusterId,
    pub node_id: u64,
    pub secret: Secret,
    /// The cluster CA: certificate (DER) and key (PKCS#8 DER; empty on a node that is not a
    /// voter).
    pub ca_cert: Vec<u8>,
    pub ca_key: Vec<u8>,
    /// This node's certificate (DER, issued by the CA) and key (PKCS#8 DER).
    pub node_cert: Vec<u8>,
    pub node_key: Vec<u8>,
    /// When the node certificate expires (Unix seconds; 0: issued before certificates
    /// expired, renewed at the first chance).
    pub node_cert_expires: u64,
    /// When this node received it (Unix seconds): with `node_cert_expires`, its lifetime,
    /// a third of which is left when it is renewed.
    pub node_cert_since: u64,
    /// The members at join time and their certificate fingerprints: trusted until this node's
    /// replica (which binds every member to its certificate) has them.
    pub peers: Vec<(u64, [u8; 32])>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cluster", &self.cluster)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// The contents of a join token: which cluster, how to recognise its CA, and the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub cluster: ClusterId,
    pub ca_fingerprint: [u8; 32],
    pub secret: Secret,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}-{}-{}-{}",
            self.cluster,
            hex(&self.ca_fingerprint),
            hex(&self.secret.0)
        )
    }
}

impl std::str::FromStr for Token {
    type Err = Error;

    fn from_str(s: &str) -> Result<Token, Error> {
        let bad = |why: &str| Error::BadToken(why.to_string());
        let mut parts = s.trim().split('-');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(bad(
                "it does not start with LDNS1- (copy the whole line that `linkdns token` prints)",
            ));
        }
        let (Some(cluster), Some(ca), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it must have four parts separated by '-'"));
        };
        Ok(Token {
            cluster: ClusterId(unhex(cluster).ok_or_else(|| bad("the cluster id is damaged"))?),
            ca_fingerprint: unhex(ca).ok_or_else(|| bad("the CA fingerprint is damaged"))?,
            secret: Secret(unhex(secret).ok_or_else(|| bad("the secret is damaged"))?),
        })
    }
}

impl Identity {
    /// A new cluster: id, secret, CA, and the certificate of its first node `node_id`.
    pub fn bootstrap(node_id: u64) -> Result<Identity, Error> {
        let rng = SystemRandom::new();
        let mut cluster = [0u8; 16];
        let mut secret = [0u8; 32];
        rng.fill(&mut cluster)
            .and_then(|()| rng.fill(&mut secret))
            .map_err(|_| Error::Crypto("no system randomness".into()))?;
        let cluster = ClusterId(cluster);
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let ca_cert = ca_params(cluster).self_signed(&ca_key).map_err(crypto)?;
        let node_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)?;
        let mut identity = Identity {
            cluster,
            node_id,
            secret: Secret(secret),
            ca_cert: ca_cert.der().to_vec(),
            ca_key: ca_key.serialize_der(),
            node_cert: Vec::new(),
            node_key: node_key.serialize_der(),
            node_cert_expires: 0,
            node_cert_since: unix_now(),
            peers: Vec::new(),
        };
        let (cert, expires) =
            identity.issue(node_id, &RawPublicKey::of(&node_key), DEFAULT_CERT_VALIDITY)?;
        identity.node_cert = cert;
        identity.node_cert_expires = expires;
        Ok(identity)
    }

    /// Whether this node holds the CA key (voters do).
    pub fn has_ca_key(&self) -> bool {
        !self.ca_key.is_empty()
    }

    /// Whether the node certificate is due for renewal at `now`: a third of its lifetime (or
    /// of `validity`, when its start is unknown) left, or no expiry recorded.
    pub fn renewal_due(&self, now: u64, validity: Duration) -> bool {
        if self.node_cert_expires == 0 {
            return true;
        }
        let lifetime = match self.node_cert_expires.checked_sub(self.node_cert_since) {
            Some(l) if self.node_cert_since != 0 && l > 0 => l,
            _ => validity.as_secs(),
        };
        self.node_cert_expires.saturating_sub(now) < lifetime / 3
    }

    /// Issues the certificate of node `node_id` for `public_key` (a joining or renewing node's
    /// key), valid for `validity` from now. Returns it and when it expires (Unix seconds).
    pub fn issue(
        &self,
        node_id: u64,
        public_key: &RawPublicKey,
        validity: Duration,
    ) -> Result<(Vec<u8>, u64), Error> {
        let now = unix_now();
        let expires = now.saturating_add(validity.as_secs());
        let cert = self.issue_between(
            node_id,
            public_key,
            now.saturating_sub(CLOCK_SKEW.as_secs()),
            expires,
        )?;
        Ok((cert, expires))
    }

    /// Issues a certificate of node `node_id` valid from `not_before` to `not_after` (Unix
    /// seconds). Only a holder of the CA key can.
    pub fn issue_between(
        &self,
        node_id: u64,
        public_key: &RawPublicKey,
        not_before: u64,
        not_after: u64,
    ) -> Result<Vec<u8>, Error> {
        if !self.has_ca_key() {
            return Err(Error::Crypto(
                "this node holds no CA key: only voters issue certificates".into(),
            ));
        }
        let ca_key = KeyPair::try_from(self.ca_key.as_slice()).map_err(crypto)?;
        let issuer = Issuer::new(ca_params(self.cluster), ca_key);
        let mut params = CertificateParams::new(vec![
            node_name(self.cluster, node_id),
            member_name(self.cluster),
        ])
        .map_err(crypto)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("linkdns node {node_id}"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = datetime(not_before)?;
        params.not_after = datetime(not_after)?;
        let cert = params.signed_by(public_key, &issuer).map_err(crypto)?;
        Ok(cert.der().to_vec())
    }

    /// The fingerprint of this node's own certificate.
    pub fn cert_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.node_cert)
    }

    /// The token that lets a new host join this cluster.
    pub fn token(&self) -> Token {
        Token {
            cluster: self.cluster,
            ca_fingerprint: fingerprint(&self.ca_cert),
            secret: self.secret.clone(),
        }
    }

    pub fn ca_cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.ca_cert.clone())
    }

    /// This node's certificate chain (node, CA) and key, as rustls wants them.
    pub fn chain(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            vec![
                CertificateDer::from(self.node_cert.clone()),
                self.ca_cert_der(),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.node_key.clone())),
        )
    }

    /// Reads `DIR/cluster.json`; `None` if the data dir has none (a node never bootstrapped or
    /// joined).
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, Error> {
        let path = data_dir.join(IDENTITY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let stored: Stored =
            serde_json::from_slice(&bytes).map_err(|e| Error::DamagedIdentity {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        stored
            .into_identity()
            .map(Some)
            .map_err(|reason| Error::DamagedIdentity { path, reason })
    }

    /// Writes `DIR/cluster.json` (0600) atomically: a crash leaves the old file or the new one.
    /// Holds the file's lock while it writes (see [`Identity::update`]).
    pub fn save(&self, data_dir: &Path) -> Result<(), Error> {
        let _lock = IdentityLock::take(data_dir)?;
        self.write_file(data_dir)
    }

    /// Changes the identity file in place: loads it, runs `change`, writes it back, all under
    /// an exclusive lock on `DIR/cluster.json.lock`. Writers in different processes (`linkdns
    /// token --rotate` beside the node's own certificate renewal) never lose each other's
    /// change. Returns the identity written (`None`: there was no file, nothing written).
    pub fn update(
        data_dir: &Path,
        change: impl FnOnce(&mut Identity),
    ) -> Result<Option<Identity>, Error> {
        let _lock = IdentityLock::take(data_dir)?;
        let Some(mut identity) = Identity::load(data_dir)? else {
            return Ok(None);
        };
        change(&mut identity);
        identity.write_file(data_dir)?;
        Ok(Some(identity))
    }

    /// Writes the file through a temporary one of its own name (never shared with another
    /// writer), then renames it over `cluster.json`.
    fn write_file(&self, data_dir: &Path) -> Result<(), Error> {
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = data_dir.join(IDENTITY_FILE);
        let tmp = data_dir.join(format!(
            "{IDENTITY_FILE}.tmp.{}.{}",
            std::process::id(),
            WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&Stored::from(self))
            .map_err(|e| io(std::io::Error::other(e)))?;
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp)?;
            file.write_all(&body)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        if let Ok(dir) = std::fs::File::open(data_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Moves `DIR/cluster.json` aside (after this node left or was removed), without the CA
    /// key, the join secret and the node's own key: what stays is a record (the cluster, the
    /// node id, its certificate), nothing that lets anyone back in or pose as a member (to a
    /// joining host, say, which would hand it the join secret) while the certificate is valid.
    pub fn retire(data_dir: &Path, suffix: &str) -> Result<PathBuf, Error> {
        let path = data_dir.join(IDENTITY_FILE);
        // All under the lock: a renewal finishing meanwhile finds no file and writes none.
        let _lock = IdentityLock::take(data_dir)?;
        if let Some(mut identity) = Identity::load(data_dir)? {
            identity.ca_key.clear();
            identity.secret = Secret([0; 32]);
            identity.node_key.clear();
            identity.peers.clear();
            identity.write_file(data_dir)?;
        }
        let to = data_dir.join(format!("{IDENTITY_FILE}.{suffix}"));
        std::fs::rename(&path, &to).map_err(|source| Error::Io { path, source })?;
        Ok(to)
    }
}

/// The exclusive lock on `DIR/cluster.json.lock` (an advisory `flock`, released when the file
/// closes), held by every writer of the identity file.
struct IdentityLock(#[allow(dead_code)] std::fs::File);

impl IdentityLock {
    fn take(data_dir: &Path) -> Result<IdentityLock, Error> {
        let path = data_dir.join(format!("{IDENTITY_FILE}.lock"));
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        #[cfg(unix)]
        loop {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor this function owns (the open file above); no
            // memory is passed.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Io { path, source: e });
            }
        }
        Ok(IdentityLock(file))
    }
}

/// A public key as sent by a joining node: the raw P-256 point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPublicKey(pub Vec<u8>);

impl RawPublicKey {
    pub fn of(key: &KeyPair) -> RawPublicKey {
        RawPublicKey(key.public_key_raw().to_vec())
    }

    /// Whether the bytes are an uncompressed P-256 point, as a node sends its key; if not, why.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.0.len() == 65 && self.0.first() == Some(&4) {
            Ok(())
        } else {
            Err("the public key is not an uncompressed P-256 point")
        }
    }
}

impl PublicKeyData for RawPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// A key pair for a joining node; the private half never leaves the host.
pub fn new_node_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto)
}

/// The parameters of the cluster CA. Rebuilt (not parsed) when issuing: the issuer's name and
/// key identifier method are all `Issuer` needs, and they follow from the cluster id.
fn ca_params(cluster: ClusterId) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("linkdns cluster {cluster}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The certificate name of node `id`.
pub fn node_name(cluster: ClusterId, id: u64) -> String {
    format!("node-{id}.{cluster}.linkdns")
}

/// The certificate name every member carries.
pub fn member_name(cluster: ClusterId) -> String {
    format!("member.{cluster}.linkdns")
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn datetime(unix: u64) -> Result<time::OffsetDateTime, Error> {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| Error::Crypto(format!("time {unix} is out of range")))
}

fn crypto(e: rcgen::Error) -> Error {
    Error::Crypto(e.to_string())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// The file format: hex strings, so the file reads as text.
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    cluster: String,
    node_id: u64,
    secret: String,
    ca_cert: String,
    ca_key: String,
    node_cert: String,
    node_key: String,
    #[serde(default)]
    node_cert_expires: u64,
    #[serde(default)]
    node_cert_since: u64,
    #[serde(default)]
    peers: Vec<(u64, String)>,
}

impl From<&Identity> for Stored {
    fn from(i: &Identity) -> Stored {
        Stored {
            version: 1,
            cluster: i.cluster.to_string(),
            node_id: i.node_id,
            secret: hex(&i.secret.0),
            ca_cert: hex(&i.ca_cert),
            ca_key: hex(&i.ca_key),
            node_cert: hex(&i.node_cert),
            node_key: hex(&i.node_key),
            node_cert_expires: i.node_cert_expires,
            node_cert_since: i.node_cert_since,
            peers: i.peers.iter().map(|(id, f)| (*id, hex(f))).collect(),
        }
    }
}

impl Stored {
    fn into_identity(self) -> Result<Identity, String> {
        if self.version != 1 {
            return Err(format!("unknown version {}", self.version));
        }
        let bytes = |name: &str, s: &str| -> Result<Vec<u8>, String> {
            if s.len() % 2 != 0 {
                return Err(format!("{name} is not hex"));
            }
            (0..s.len() / 2)
                .map(|i| {
                    s.get(i * 2..i * 2 + 2)
                        .and_then(|b| u8::from_str_radix(b, 16).ok())
                        .ok_or_else(|| format!("{name} is not hex"))
                })
                .collect()
        };
        Ok(Identity {
            cluster: ClusterId(unhex(&self.cluster).ok_or("cluster id is not 32 hex digits")?),
            node_id: self.node_id,
            secret: Secret(unhex(&self.secret).ok_or("secret is not 64 hex digits")?),
            ca_cert: bytes("ca_cert", &self.ca_cert)?,
            ca_key: bytes("ca_key", &self.ca_key)?,
            node_cert: bytes("node_cert", &self.node_cert)?,
            node_key: bytes("node_key", &self.node_key)?,
            node_cert_expires: self.node_cert_expires,
            node_cert_since: self.node_cert_since,
            peers: self
                .peers
                .iter()
                .map(|(id, f)| {
                    unhex(f)
                        .map(|f| (*id, f))
                        .ok_or("peer fingerprint is not hex")
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

//! rustls configurations for peer traffic (TLS 1.3 only, ring provider):
//! - the server side asks for a client certificate but also lets a joining node (which has none
//!   yet) connect; such a connection may only send a join request;
//! - members dial members with their node certificate and check the callee's node name;
//! - a joining node checks the server against the CA fingerprint in its token.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::identity::{fingerprint, member_name, node_name, ClusterId, Identity, Token};
use crate::Error;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &Identity) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca_cert_der()).map_err(tls)?;
    Ok(Arc::new(roots))
}

fn tls(e: rustls::Error) -> Error {
    Error::Crypto(e.to_string())
}

/// The TLS side of a member: its server and client configurations, and a checker for the
/// certificates of peers that say who they are.
pub struct MemberTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    cluster: ClusterId,
    names: Arc<WebPkiServerVerifier>,
}

impl MemberTls {
    pub fn new(identity: &Identity) -> Result<MemberTls, Error> {
        let provider = provider();
        let roots = roots(identity)?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Crypto(e.to_string()))?;
        let (chain, key) = identity.chain();
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(tls)?;
        let names = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| Error::Crypto(e.to_string()))?;
        Ok(MemberTls {
            server: Arc::new(server),
            client: Arc::new(client),
            cluster: identity.cluster,
            names,
        })
    }

    /// The name to dial node `id` by: the handshake fails unless the callee holds its cert.
    pub fn server_name(&self, id: u64) -> Result<ServerName<'static>, Error> {
        ServerName::try_from(node_name(self.cluster, id)).map_err(|e| Error::Crypto(e.to_string()))
    }

    /// Whether `chain` (as presented by a client) is a current certificate of node `id` of
    /// this cluster; if not, why. The handshake already checked the chain; this checks the
    /// name, and the validity again (a connection outlives no certificate's check).
    pub fn check_node(&self, chain: &[CertificateDer<'static>], id: u64) -> Result<(), String> {
        let no = || format!("no certificate of this cluster for node {id}");
        let (leaf, rest) = chain.split_first().ok_or_else(no)?;
        let name = self.server_name(id).map_err(|_| no())?;
        match self
            .names
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
        {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) => Err(format!(
                "the certificate of node {id} expired; it renews through the leader before that, so the node was away too long: remove it and join again"
            )),
            Err(_) => Err(no()),
        }
    }
}

/// The client configuration of a joining node: the server must present a certificate issued by
/// the CA whose fingerprint the token carries.
pub fn join_client(token: &Token) -> Result<(Arc<ClientConfig>, ServerName<'static>), Error> {
    let provider = provider();
    let verifier = PinnedCa {
        fingerprint: token.ca_fingerprint,
        cluster: token.cluster,
        provider: provider.clone(),
    };
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = ServerName::try_from(member_name(token.cluster))
        .map_err(|e| Error::Crypto(e.to_string()))?;
    Ok((Arc::new(client), name))
}

/// Accepts a server whose chain includes the CA named by a fingerprint, and whose certificate
/// that CA issued for `member.<cluster>.linkdns`.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    cluster: ClusterId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            // Not the CA the token names (a token of another cluster?): an unknown issuer.
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(member_name(self.cluster))
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

//! TLS material read from files and reloaded when they change: a standalone node's HTTPS, and
//! the mutual TLS of a cluster's peer port (the node's certificate serves its port and calls its
//! peers; the cluster CA is what both sides trust).

use std::sync::Arc;

/// The certificate a TLS listener presents, read again from its files when they change
/// ([`CertificateFiles::watch`]): a rotated certificate is served to new connections within
/// seconds, while connections already open go on with theirs.
#[derive(Debug)]
pub struct CertificateFiles {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::RwLock<(Vec<u8>, Arc<rustls::sign::CertifiedKey>)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// ring, AES-128-GCM first: on a blob store's large bodies it encrypts markedly faster than
/// AES-256-GCM (clients usually offer that first; servers here prefer their own order).
fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| match suite.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
        _ => 2,
    });
    provider
}

impl CertificateFiles {
    /// The certificate in `cert` and `key` now (refused when they do not load).
    pub fn new(
        cert: &std::path::Path,
        key: &std::path::Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let current = Self::load(cert, key, &provider)?;
        Ok(Self { cert: cert.to_owned(), key: key.to_owned(), current: std::sync::RwLock::new(current), provider })
    }

    /// The files' contents (what a change is noticed by) and the certificate they make.
    fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        provider: &rustls::crypto::CryptoProvider,
    ) -> anyhow::Result<(Vec<u8>, Arc<rustls::sign::CertifiedKey>)> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let cert_pem = std::fs::read(cert).map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
        let key_pem = std::fs::read(key).map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", cert.display()))?;
        anyhow::ensure!(!chain.is_empty(), "--tls-cert {}: no certificate in it", cert.display());
        let private =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
        let signing = provider
            .key_provider
            .load_private_key(private)
            .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", key.display()))?;
        let certified = rustls::sign::CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?;
        Ok(([cert_pem, key_pem].concat(), Arc::new(certified)))
    }

    /// Reads the files again every `every` until `shutdown`; a pair that does not load (say,
    /// half written) is logged and the previous certificate kept.
    pub async fn watch(self: Arc<Self>, every: std::time::Duration, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let (cert, key, provider) = (self.cert.clone(), self.key.clone(), self.provider.clone());
            let loaded = tokio::task::spawn_blocking(move || Self::load(&cert, &key, &provider)).await;
            match loaded {
                Ok(Ok((bytes, certified))) => {
                    let mut current = self.current.write().expect("certificate lock");
                    if current.0 != bytes {
                        *current = (bytes, certified);
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "TLS certificate files changed and do not load; serving the previous one")
                }
                Err(e) => tracing::warn!(error = %e, "reading the TLS certificate failed"),
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").1.clone())
    }
}

/// A TLS acceptor presenting the certificate in `cert` and `key` (PEM), and those files, to
/// [`CertificateFiles::watch`].
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, Arc<CertificateFiles>)> {
    let provider = Arc::new(provider());
    let files = Arc::new(CertificateFiles::new(cert, key, provider.clone())?);
    let acceptor = acceptor(provider, Arc::new(rustls::server::NoClientAuth), files.clone())?;
    Ok((acceptor, files))
}

/// A server presenting `files`' certificate, asking clients for what `clients` verifies: HTTP/1.1,
/// the server's cipher order.
fn acceptor(
    provider: Arc<rustls::crypto::CryptoProvider>,
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    files: Arc<CertificateFiles>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(files);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl rustls::client::ResolvesClientCert for CertificateFiles {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").1.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A peer port's TLS: the acceptor (a client certificate from the cluster CA required), the
/// client configuration for calling peers (the same certificate; the cluster CA as the only
/// root), the node's certificate files and the CA file to watch.
pub struct PeerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub client: rustls::ClientConfig,
    pub files: Arc<CertificateFiles>,
    pub trust: Arc<PeerTrust>,
}

/// What a node trusts on its peer port, both ways: the CA certificates in the `--peer-tls-ca`
/// file, read again when it changes ([`PeerTrust::watch`]). A new CA reaches every node through
/// its files (a Secret's update on Kubernetes) without a restart; a bundle of the old and the
/// new CA lets nodes that already present new certificates and nodes that do not yet talk.
#[derive(Debug)]
pub struct PeerTrust {
    ca: std::path::PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: std::sync::RwLock<Verifiers>,
}

#[derive(Debug)]
struct Verifiers {
    pem: Vec<u8>,
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    servers: Arc<rustls::client::WebPkiServerVerifier>,
}

impl PeerTrust {
    fn new(ca: &std::path::Path, provider: Arc<rustls::crypto::CryptoProvider>) -> anyhow::Result<Self> {
        let current = Self::load(ca, &provider)?;
        Ok(Self { ca: ca.to_owned(), provider, current: std::sync::RwLock::new(current) })
    }

    fn load(ca: &std::path::Path, provider: &Arc<rustls::crypto::CryptoProvider>) -> anyhow::Result<Verifiers> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
            roots.add(cert).map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
        }
        anyhow::ensure!(!roots.is_empty(), "--peer-tls-ca {}: no certificate in it", ca.display());
        let roots = Arc::new(roots);
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
        let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
        Ok(Verifiers { pem, clients, servers })
    }

    fn now(&self) -> std::sync::RwLockReadGuard<'_, Verifiers> {
        self.current.read().expect("trust lock")
    }

    // Handshake signatures are checked the same way both ways, whatever the CA.
    fn signature_12(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn signature_13(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }

    /// Reads the CA file again every `every` until `shutdown`; one that does not load is logged
    /// and the previous trust kept.
    pub async fn watch(self: Arc<Self>, every: std::time::Duration, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let (ca, provider) = (self.ca.clone(), self.provider.clone());
            match tokio::task::spawn_blocking(move || Self::load(&ca, &provider)).await {
                Ok(Ok(loaded)) => {
                    let mut current = self.current.write().expect("trust lock");
                    if current.pem != loaded.pem {
                        *current = loaded;
                        tracing::info!(ca = %self.ca.display(), "peer CA reloaded");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "the peer CA file changed and does not load; trusting the previous one")
                }
                Err(e) => tracing::warn!(error = %e, "reading the peer CA failed"),
            }
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for PeerTrust {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints (they are optional): the node has one certificate to present anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.now().clients.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signature_12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signature_13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

impl rustls::client::danger::ServerCertVerifier for PeerTrust {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.now().servers.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signature_12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signature_13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

/// [`PeerTls`] from PEM files: the cluster CA's certificate(s), the node's certificate and key.
pub fn peer_tls(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<PeerTls> {
    let provider = Arc::new(provider());
    let trust = Arc::new(PeerTrust::new(ca, provider.clone())?);
    let files = Arc::new(CertificateFiles::new(cert, key, provider.clone())?);
    let server = acceptor(provider.clone(), trust.clone(), files.clone())?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(trust.clone())
        .with_client_cert_resolver(files.clone());
    Ok(PeerTls { acceptor: server, client, files, trust })
}

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
/// client configuration for calling peers (the same certificate; the CA as the only root), and
/// the node's certificate files to watch.
pub struct PeerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub client: rustls::ClientConfig,
    pub files: Arc<CertificateFiles>,
}

/// [`PeerTls`] from PEM files: the cluster CA's certificate, the node's certificate and key.
pub fn peer_tls(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<PeerTls> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for ca_cert in
        CertificateDer::pem_file_iter(ca).map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?
    {
        let ca_cert = ca_cert.map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
        roots.add(ca_cert).map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "--peer-tls-ca {}: no certificate in it", ca.display());
    let roots = Arc::new(roots);
    let provider = Arc::new(provider());
    let files = Arc::new(CertificateFiles::new(cert, key, provider.clone())?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("--peer-tls-ca {}: {e}", ca.display()))?;
    let server = acceptor(provider.clone(), verifier, files.clone())?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(files.clone());
    Ok(PeerTls { acceptor: server, client, files })
}

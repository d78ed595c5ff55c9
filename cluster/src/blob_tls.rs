//! Calling a cluster's datanodes over HTTPS (the blob API with `--tls-cert`), as the operator and
//! `cairn status` do: the certificate is checked against the cluster's [`BlobTls`] — its CA and
//! the one name every datanode's certificate carries (the cluster's Service) — whatever address
//! the datanode is reached at (a Pod's own DNS name, an IP, a port-forward).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::topology::BlobTls;

/// A TLS client configuration that trusts `tls.ca_pem` only and expects `tls.server_name`.
pub fn client_config(tls: &BlobTls) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| anyhow::anyhow!("the cluster's blob CA: {e}"))?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "the cluster's blob CA holds no certificate");
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("the cluster's blob CA: {e}"))?;
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| anyhow::anyhow!("{:?} is no server name: {e}", tls.server_name))?;
    let verifier = Arc::new(FixedName { inner, name });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// WebPKI verification for a fixed name instead of the one connected to: the chain, validity and
/// signatures are checked as always.
#[derive(Debug)]
struct FixedName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_tls::PeerCa;

    /// A real handshake over loopback: the datanode's certificate names the Service, the client
    /// connects by IP and accepts it; another name or another CA is refused.
    #[tokio::test]
    async fn the_service_name_is_checked_whatever_address_is_dialled() {
        use rustls::pki_types::pem::PemObject;
        let ca = PeerCa::generate("c1").unwrap();
        let node = ca.issue("n1", &["c1.store.svc".into(), "c1-n1.c1-nodes.store.svc".into()], 1).unwrap();
        let certs = CertificateDer::pem_slice_iter(node.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(node.key_pem.as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move { acceptor.accept(stream).await });
            }
        });
        let handshake = |tls: BlobTls| async move {
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&tls)?));
            let stream = tokio::net::TcpStream::connect(addr).await?;
            connector.connect(ServerName::IpAddress(addr.ip().into()), stream).await?;
            anyhow::Ok(())
        };
        let good = BlobTls { ca_pem: ca.cert_pem().to_owned(), server_name: "c1.store.svc".into() };
        handshake(good.clone()).await.unwrap();
        let other_name = BlobTls { server_name: "c2.store.svc".into(), ..good.clone() };
        assert!(handshake(other_name).await.is_err());
        let stranger = PeerCa::generate("c1").unwrap();
        let other_ca = BlobTls { ca_pem: stranger.cert_pem().to_owned(), ..good };
        assert!(handshake(other_ca).await.is_err());
        assert!(client_config(&BlobTls { ca_pem: "junk".into(), server_name: "x".into() }).is_err());
    }
}

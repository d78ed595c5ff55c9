//! Mutual TLS between a cluster's datanodes (docs/security.md): a cluster CA, and per-node
//! certificates it issues, good both to serve a node's peer port and to call its peers'.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A cluster's certificate authority: its certificate and key (PEM).
pub struct PeerCa {
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for PeerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCa").finish_non_exhaustive()
    }
}

/// A node's certificate and key (PEM).
pub struct NodeCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl PeerCa {
    /// A new CA for `cluster`, valid for ten years.
    pub fn generate(cluster: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("cairn cluster {cluster} peer CA"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_after = time_in_days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A CA kept before (its certificate and key, PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        Ok(Self { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `node`, valid for `days`, for these host names and IP addresses: a
    /// server's (its peer port) and a client's (its calls to peers) at once.
    pub fn issue(&self, node: &str, hosts: &[String], days: i64) -> anyhow::Result<NodeCertificate> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &ca_key)?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, node);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = time_in_days(0) - time::Duration::minutes(5);
        params.not_after = time_in_days(days);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeCertificate { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn time_in_days(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_ca_issues_certificates_for_its_nodes() {
        let ca = PeerCa::generate("c1").unwrap();
        let kept = PeerCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let node = kept.issue("n1", &["127.0.0.1".into(), "n1.c1-nodes.store.svc".into()], 30).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(node.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), "n1");
        assert!(cert.issuer().to_string().contains("cairn cluster c1 peer CA"), "{}", cert.issuer());
        let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.len();
        assert_eq!(sans, 2);
        let usage = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(usage.server_auth && usage.client_auth);
        assert!(PeerCa::from_pem("not a certificate", ca.key_pem()).is_err());
    }
}

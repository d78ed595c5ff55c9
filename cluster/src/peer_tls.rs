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
        // Valid from an hour ago: a peer whose clock is behind still accepts a fresh renewal.
        self.issue_between(node, hosts, time_in_days(0) - time::Duration::hours(1), time_in_days(days))
    }

    /// A certificate for `node` valid from `not_before` to `not_after` (see [`issue`](Self::issue)).
    pub fn issue_between(
        &self,
        node: &str,
        hosts: &[String],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> anyhow::Result<NodeCertificate> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &ca_key)?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, node);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeCertificate { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Why a node's certificate must be issued anew, or `None` while it may be kept: it is missing
/// or unreadable, another CA issued it, it names other hosts than `hosts`, or less than a third
/// of its validity is left at `now` (renewed well before it expires, as cert-manager does).
pub fn renewal_reason(
    ca: &PeerCa,
    ca_pem_given: Option<&str>,
    cert_pem: Option<&str>,
    hosts: &[String],
    now: time::OffsetDateTime,
) -> Option<String> {
    let Some(cert_pem) = cert_pem else { return Some("no certificate yet".into()) };
    if ca_pem_given != Some(ca.cert_pem()) {
        return Some("its CA certificate is not the cluster's".into());
    }
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else {
        return Some("its certificate is not PEM".into());
    };
    let Ok(cert) = pem.parse_x509() else { return Some("its certificate does not parse".into()) };
    let Ok((_, ca_pem)) = x509_parser::pem::parse_x509_pem(ca.cert_pem().as_bytes()) else {
        return Some("the CA certificate is not PEM".into());
    };
    let Ok(ca_cert) = ca_pem.parse_x509() else { return Some("the CA certificate does not parse".into()) };
    if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
        return Some("the cluster's CA did not sign it".into());
    }
    let mut named = names_of(&cert);
    // As the certificate says them: IP addresses in canonical form, DNS names in lower case.
    let mut wanted: Vec<String> = hosts.iter().map(|h| canonical_host(h)).collect();
    named.sort();
    wanted.sort();
    if named != wanted {
        return Some(format!("it names {named:?}, not {wanted:?}"));
    }
    let (from, until) = (cert.validity().not_before.to_datetime(), cert.validity().not_after.to_datetime());
    let renew_at = until - (until - from) / 3;
    if now >= renew_at {
        return Some(format!("it expires at {until} (renewed from {renew_at})"));
    }
    None
}

/// Whether `key_pem` is the private key of the first certificate in `cert_pem`.
pub fn key_matches(cert_pem: &str, key_pem: &str) -> bool {
    let Ok(key) = KeyPair::from_pem(key_pem) else { return false };
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else { return false };
    let Ok(cert) = pem.parse_x509() else { return false };
    cert.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
}

/// The DNS names and IP addresses (canonical) in the first certificate of `pem`.
pub fn certificate_names(pem: &str) -> anyhow::Result<Vec<String>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| anyhow::anyhow!("not PEM: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    Ok(names_of(&cert))
}

fn names_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_ascii_lowercase(),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4 bytes")).to_string(),
                    16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16 bytes")).to_string(),
                    _ => String::new(),
                },
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A host as a certificate carries it: an IP address in canonical form, a DNS name in lower case.
fn canonical_host(host: &str) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
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

    #[test]
    fn certificates_are_renewed_in_the_last_third_of_their_life_or_when_anything_changed() {
        let ca = PeerCa::generate("c1").unwrap();
        let hosts = vec!["c1-n1.c1-nodes.store.svc".to_string(), "10.0.0.1".to_string()];
        let node = ca.issue("n1", &hosts, 90).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let reason = |ca_pem: Option<&str>, cert: Option<&str>, hosts: &[String], at| {
            renewal_reason(&ca, ca_pem, cert, hosts, at)
        };
        let cert = Some(node.cert_pem.as_str());
        assert_eq!(reason(Some(ca.cert_pem()), cert, &hosts, now), None);
        assert_eq!(reason(Some(ca.cert_pem()), cert, &hosts, now + time::Duration::days(59)), None);
        let late = reason(Some(ca.cert_pem()), cert, &hosts, now + time::Duration::days(61)).unwrap();
        assert!(late.contains("expires"), "{late}");
        assert!(reason(Some(ca.cert_pem()), None, &hosts, now).unwrap().contains("no certificate"));
        assert!(reason(None, cert, &hosts, now).unwrap().contains("CA certificate"));
        assert!(reason(Some(ca.cert_pem()), Some("junk"), &hosts, now).unwrap().contains("PEM"));
        let moved = vec!["c1-n1.c1-nodes.other.svc".to_string(), "10.0.0.1".to_string()];
        assert!(reason(Some(ca.cert_pem()), cert, &moved, now).unwrap().contains("names"));
        // Another CA's certificate, even presented with this CA's certificate beside it.
        // Hosts as a user may write them: the certificate's canonical forms are the same names.
        let spelled = vec!["C1-N1.c1-nodes.store.svc".to_string(), "10.0.0.1".to_string()];
        assert_eq!(reason(Some(ca.cert_pem()), cert, &spelled, now), None);
        let v6 = ca.issue("n1", &["fd00::1".into()], 90).unwrap();
        assert_eq!(reason(Some(ca.cert_pem()), Some(&v6.cert_pem), &["FD00:0:0::0001".to_string()], now), None);
        assert!(key_matches(&node.cert_pem, &node.key_pem));
        assert!(!key_matches(&node.cert_pem, &v6.key_pem), "another certificate's key");
        assert!(!key_matches(&node.cert_pem, "junk"));
        let stranger = PeerCa::generate("c1").unwrap().issue("n1", &hosts, 90).unwrap();
        let signed = reason(Some(ca.cert_pem()), Some(&stranger.cert_pem), &hosts, now).unwrap();
        assert!(signed.contains("did not sign"), "{signed}");
    }
}

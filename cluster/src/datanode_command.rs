//! The datanode's command line as one type: both platforms (Kubernetes Pods, local processes)
//! build a datanode's arguments with [`DatanodeCommand::to_args`], so a flag is spelled in one
//! place (the datanode's own parser is `datanode/src/main.rs`).

/// A CA certificate, a certificate and its key, as files the datanode sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// A datanode of a cluster, on volumes from its machine's disk agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatanodeCommand {
    pub etcd: Vec<String>,
    pub cluster: String,
    pub namespace: String,
    pub node_id: String,
    pub zone: String,
    /// The disk agent's unix socket.
    pub disk_agent: String,
    /// Address the API listens on.
    pub listen: String,
    /// Address other nodes reach this one at, when it is not `listen`.
    pub advertise: Option<String>,
    /// Address the replica routes listen on apart from the blob API (peers reach it at
    /// `advertise`'s host).
    pub peer_listen: Option<String>,
    /// The client certificate for etcd.
    pub etcd_tls: Option<TlsFiles>,
    /// Mutual TLS on the peer port (the cluster CA, the node's certificate and key).
    pub peer_tls: Option<TlsFiles>,
    /// HTTPS on the blob API: the certificate (chain) and key files.
    pub tls: Option<(String, String)>,
    /// Address the S3 API listens on (docs/s3.md: every node of a cluster, or none).
    pub s3_listen: Option<String>,
    /// The region S3 clients sign for (the same on every node; default the datanode's).
    pub s3_region: Option<String>,
    /// The domain of virtual-host-style S3 addressing (`<bucket>.<domain>`).
    pub s3_domain: Option<String>,
    /// More flags, as given (a platform's own settings, e.g. for tests).
    pub extra: Vec<String>,
}

impl DatanodeCommand {
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            ("--etcd", self.etcd.join(",")),
            ("--cluster", self.cluster.clone()),
            ("--namespace", self.namespace.clone()),
            ("--node-id", self.node_id.clone()),
            ("--zone", self.zone.clone()),
            ("--disk-agent", self.disk_agent.clone()),
            ("--listen", self.listen.clone()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
        if let Some(advertise) = &self.advertise {
            args.extend(["--advertise".to_owned(), advertise.clone()]);
        }
        if let Some(peer) = &self.peer_listen {
            args.extend(["--peer-listen".to_owned(), peer.clone()]);
        }
        if let Some(tls) = &self.etcd_tls {
            for (flag, file) in [("--etcd-ca", &tls.ca), ("--etcd-cert", &tls.cert), ("--etcd-key", &tls.key)] {
                args.extend([flag.to_owned(), file.clone()]);
            }
        }
        if let Some(tls) = &self.peer_tls {
            for (flag, file) in
                [("--peer-tls-ca", &tls.ca), ("--peer-tls-cert", &tls.cert), ("--peer-tls-key", &tls.key)]
            {
                args.extend([flag.to_owned(), file.clone()]);
            }
        }
        if let Some((cert, key)) = &self.tls {
            args.extend(["--tls-cert".to_owned(), cert.clone(), "--tls-key".to_owned(), key.clone()]);
        }
        for (flag, value) in
            [("--s3-listen", &self.s3_listen), ("--s3-region", &self.s3_region), ("--s3-domain", &self.s3_domain)]
        {
            if let Some(value) = value {
                args.extend([flag.to_owned(), value.clone()]);
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_one_flag_and_its_value() {
        let mut command = DatanodeCommand {
            etcd: vec!["https://e1:2379".into(), "https://e2:2379".into()],
            cluster: "c".into(),
            namespace: "ns".into(),
            node_id: "m1".into(),
            zone: "".into(),
            disk_agent: "/run/a.sock".into(),
            listen: "0.0.0.0:7480".into(),
            advertise: None,
            peer_listen: Some("0.0.0.0:7481".into()),
            etcd_tls: None,
            peer_tls: Some(TlsFiles { ca: "/t/ca.crt".into(), cert: "/t/m1.crt".into(), key: "/t/m1.key".into() }),
            tls: None,
            s3_listen: None,
            s3_region: None,
            s3_domain: None,
            extra: vec!["--peer-timeout-ms".into(), "500".into()],
        };
        let args = command.to_args();
        assert_eq!(args.len() % 2, 0);
        let pairs: Vec<(&str, &str)> = args.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
        assert!(pairs.contains(&("--etcd", "https://e1:2379,https://e2:2379")));
        assert!(pairs.contains(&("--zone", "")), "an empty zone is still given: {pairs:?}");
        assert_eq!(pairs.last(), Some(&("--peer-timeout-ms", "500")), "extra flags last");
        assert!(!args.contains(&"--advertise".to_string()));
        command.advertise = Some("10.0.0.1:7480".into());
        command.etcd_tls = Some(TlsFiles { ca: "ca".into(), cert: "crt".into(), key: "key".into() });
        command.tls = Some(("/tls/tls.crt".into(), "/tls/tls.key".into()));
        command.s3_listen = Some("0.0.0.0:9000".into());
        command.s3_region = Some("eu-west-3".into());
        command.s3_domain = Some("s3.example.com".into());
        let args = command.to_args();
        let pairs: Vec<(&str, &str)> = args.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
        assert!(pairs.contains(&("--tls-cert", "/tls/tls.crt")) && pairs.contains(&("--tls-key", "/tls/tls.key")));
        assert!(pairs.contains(&("--s3-listen", "0.0.0.0:9000")));
        assert!(pairs.contains(&("--s3-region", "eu-west-3")) && pairs.contains(&("--s3-domain", "s3.example.com")));
        for flag in [
            "--advertise",
            "--etcd-ca",
            "--etcd-cert",
            "--etcd-key",
            "--tls-cert",
            "--tls-key",
            "--s3-listen",
            "--s3-region",
            "--s3-domain",
        ] {
            assert_eq!(args.iter().filter(|a| *a == flag).count(), 1, "{flag} once");
        }
    }
}

//! Leader election on a coordination.k8s.io Lease, so that of several operator replicas only one
//! reconciles at a time. Taking or renewing the lease is a replace guarded by resourceVersion.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube::ResourceExt;

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElection {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    /// How often the holder should renew.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// Takes the lease if it is free or expired, renews it if held: whether this replica leads now.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let mut lease = Lease { spec: Some(spec), ..Lease::default() };
            lease.metadata.name = Some(self.name.clone());
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let mine = current.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (current.renew_time, current.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(secs)) => {
                renewed.checked_add(jiff_seconds(secs)).map(|until| until < now).unwrap_or(true)
            }
            _ => true,
        };
        if !mine && !expired {
            return Ok(false);
        }
        lease.spec = Some(spec);
        match self.api.replace(&lease.name_any(), &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn jiff_seconds(secs: i32) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(i64::from(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_and_takeover_after_expiry() {
        // As the chart's operator ServiceAccount, in the release's namespace: its Role must do.
        use cairn_testkit::rbac::{operator_user, rendered_chart, Rbac};
        let api = cairn_testkit::MemoryApi::new().with_rbac(Rbac::from_manifests(&rendered_chart()));
        let client = api.client_as(&operator_user());
        let a = LeaderElection::new(client.clone(), "cairn-system", "cairn-operator", "a", Duration::from_secs(2));
        let b = LeaderElection::new(client, "cairn-system", "cairn-operator", "b", Duration::from_secs(2));
        assert!(a.try_lead().await.unwrap());
        assert!(!b.try_lead().await.unwrap(), "held by a");
        assert!(a.try_lead().await.unwrap(), "a renews");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(b.try_lead().await.unwrap(), "expired: b takes over");
        assert!(!a.try_lead().await.unwrap(), "a lost it");
        let used = api.accessed(&operator_user());
        for verb in ["get", "create", "update"] {
            assert!(used.contains(&(verb.into(), "coordination.k8s.io".into(), "leases".into())), "{verb}: {used:?}");
        }
    }
}

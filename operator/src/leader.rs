//! Leader election on a coordination.k8s.io Lease, so that of several operator replicas only one
//! reconciles at a time — with client-go's semantics:
//!
//! - another holder's lease is expired when it has not changed for its duration *as observed on
//!   this machine's clock* (never by comparing its renewTime with our clock: clocks differ);
//! - the leader renews every retry period and gives up leading when it has not renewed for the
//!   renew deadline, shorter than the lease, so that it stops before another replica may take over;
//! - `acquireTime` and `leaseTransitions` are kept (a new holder sets one and counts the other);
//! - on a clean exit the lease is released, so that another replica takes over at once.
//!
//! Taking or renewing the lease is a replace guarded by resourceVersion.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube::ResourceExt;

pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease as last seen (holder, renewTime, resourceVersion) and when it last changed.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElection {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Mutex::new(None),
        }
    }

    /// How often to try to take or renew the lease.
    pub fn retry_every(&self) -> Duration {
        self.duration / 7
    }

    /// How long the leader may go without renewing before it stops leading (2/3 of the lease, as
    /// client-go's 10 s of 15 s): it stops before another replica may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Takes the lease if it is free or expired, renews it if held: whether this replica leads now.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let spec = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration.as_secs() as i32),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            };
            let mut lease = Lease { spec: Some(spec), ..Lease::default() };
            lease.metadata.name = Some(self.name.clone());
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let holder = current.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        // Expiry on our own clock: since when has the record not changed?
        let record = format!("{holder}|{:?}|{}", current.renew_time, lease.resource_version().unwrap_or_default());
        let unchanged_for = {
            let mut observed = self.observed.lock().expect("observed lock");
            match observed.as_ref() {
                Some((seen, at)) if *seen == record => at.elapsed(),
                _ => {
                    *observed = Some((record, Instant::now()));
                    Duration::ZERO
                }
            }
        };
        let duration = current.lease_duration_seconds.map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
        let free = holder.is_empty() || unchanged_for > duration;
        if !mine && !free {
            return Ok(false);
        }
        let transitions = current.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(MicroTime(now)),
            acquire_time: if mine { current.acquire_time } else { Some(MicroTime(now)) },
            lease_transitions: Some(if mine { transitions } else { transitions + 1 }),
            ..current
        });
        match self.api.replace(&lease.name_any(), &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Renews every retry period while leading; returns when leadership is lost: another holder
    /// took the lease, or no renewal succeeded for the renew deadline.
    pub async fn keep_leading(&self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.retry_every()).await;
            // A renewal that does not answer in time is a renewal that failed: an API server that
            // stops answering must not keep us leading past the deadline.
            let left = self.renew_deadline().saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_lead()).await {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease failed"),
                Err(_) => tracing::warn!("renewing the leader lease did not answer in time"),
            }
            if renewed.elapsed() >= self.renew_deadline() {
                return;
            }
        }
    }

    /// Gives the lease up (on a clean exit), so that another replica takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let current = lease.spec.clone().unwrap_or_default();
        if current.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        lease.spec = Some(LeaseSpec { holder_identity: None, lease_duration_seconds: Some(1), ..current });
        match self.api.replace(&lease.name_any(), &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Changed meanwhile: someone else holds it now.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_testkit::rbac::{operator_user, rendered_chart, Rbac};

    fn elections(api: &cairn_testkit::MemoryApi, duration: Duration) -> (LeaderElection, LeaderElection) {
        let client = api.client_as(&operator_user());
        let a = LeaderElection::new(client.clone(), "cairn-system", "cairn-operator", "a", duration);
        let b = LeaderElection::new(client, "cairn-system", "cairn-operator", "b", duration);
        (a, b)
    }

    fn strict() -> cairn_testkit::MemoryApi {
        // As the chart's operator ServiceAccount, in the release's namespace: its Role must do.
        cairn_testkit::MemoryApi::new().with_rbac(Rbac::from_manifests(&rendered_chart()))
    }

    #[tokio::test]
    async fn one_leader_takeover_after_expiry_transitions_counted() {
        let api = strict();
        let (a, b) = elections(&api, Duration::from_secs(2));
        let leases: Api<Lease> = Api::namespaced(api.client(), "cairn-system");
        assert!(a.try_lead().await.unwrap());
        let first = leases.get("cairn-operator").await.unwrap().spec.unwrap();
        assert_eq!(first.lease_transitions, Some(0));
        assert!(!b.try_lead().await.unwrap(), "held by a");
        assert!(a.try_lead().await.unwrap(), "a renews");
        let renewed = leases.get("cairn-operator").await.unwrap().spec.unwrap();
        assert_eq!(renewed.acquire_time, first.acquire_time, "a renewal keeps acquireTime");
        // b sees a's renewals; once they stop for the lease's duration (on b's clock), b takes it.
        assert!(!b.try_lead().await.unwrap());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(b.try_lead().await.unwrap(), "expired: b takes over");
        assert!(!a.try_lead().await.unwrap(), "a lost it");
        let taken = leases.get("cairn-operator").await.unwrap().spec.unwrap();
        assert_eq!(taken.lease_transitions, Some(1));
        assert_ne!(taken.acquire_time, first.acquire_time);
        let used = api.accessed(&operator_user());
        for verb in ["get", "create", "update"] {
            assert!(used.contains(&(verb.into(), "coordination.k8s.io".into(), "leases".into())), "{verb}: {used:?}");
        }
    }

    /// A holder whose clock is behind ours (its renewTime far in our past) still holds the lease
    /// while it renews: expiry is judged by what we observe, not by its timestamps.
    #[tokio::test]
    async fn expiry_is_judged_on_the_local_clock() {
        let api = strict();
        let (_, b) = elections(&api, Duration::from_secs(2));
        let leases: Api<Lease> = Api::namespaced(api.client(), "cairn-system");
        let skewed = |n: i64| {
            let hour_ago = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(3600 - n);
            serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "cairn-operator"},
                "spec": {"holderIdentity": "x", "leaseDurationSeconds": 2, "renewTime": MicroTime(hour_ago)}})
        };
        let apply = kube::api::PatchParams::apply("x");
        leases.patch("cairn-operator", &apply, &kube::api::Patch::Apply(skewed(0))).await.unwrap();
        assert!(!b.try_lead().await.unwrap(), "first sight: not expired, whatever its renewTime says");
        for n in 1..4 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            leases.patch("cairn-operator", &apply, &kube::api::Patch::Apply(skewed(n))).await.unwrap();
            assert!(!b.try_lead().await.unwrap(), "x renews (its clock an hour behind): held");
        }
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(b.try_lead().await.unwrap(), "x stopped renewing for the lease's duration");
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once() {
        let api = strict();
        let (a, b) = elections(&api, Duration::from_secs(30));
        assert!(a.try_lead().await.unwrap());
        assert!(!b.try_lead().await.unwrap());
        a.release().await.unwrap();
        assert!(b.try_lead().await.unwrap(), "released: no wait for the 30 s lease");
    }

    /// A leader that cannot renew (here: refused by RBAC) stops leading within the renew deadline.
    #[tokio::test]
    async fn a_leader_that_cannot_renew_stops_within_the_deadline() {
        let api = strict();
        let (a, _) = elections(&api, Duration::from_secs(3));
        assert!(a.try_lead().await.unwrap());
        let refused = LeaderElection::new(
            api.client_as("system:serviceaccount:elsewhere:nobody"),
            "cairn-system",
            "cairn-operator",
            "a",
            Duration::from_secs(3),
        );
        let started = Instant::now();
        refused.keep_leading().await;
        let took = started.elapsed();
        assert!(took >= refused.renew_deadline() && took < Duration::from_secs(3), "{took:?}");
    }
}

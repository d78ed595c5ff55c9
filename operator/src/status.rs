//! A StoreCluster's status and Events from one reconcile pass — the same on Kubernetes (written
//! to the API server) and locally (`cairn local up` keeps it in its state file), so that
//! `cairn status` reads the same thing from both.

use cairn_resources::StoreClusterStatus;

use crate::platform::Outcome;

/// What a pass observed.
pub enum Observation<'a> {
    /// `spec.paused`: nothing was done.
    Paused,
    Pass(&'a Outcome),
}

/// An Event to record about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub action: &'static str,
    pub message: String,
}

/// The Ready condition's message while the cluster is not ready: what is missing, and the long
/// operations under way.
pub fn progress_message(outcome: &Outcome) -> String {
    let s = &outcome.status;
    let mut parts = Vec::new();
    if s.nodes_ready < s.nodes_total {
        parts.push(format!("{}/{} datanodes live", s.nodes_ready, s.nodes_total));
    }
    if s.partitions.under_replicated > 0 {
        parts.push(format!("{} partition(s) under-replicated", s.partitions.under_replicated));
    }
    parts.extend(outcome.progress.iter().cloned());
    if parts.is_empty() {
        parts.push("replicas catching up with their peers".into());
    }
    parts.join("; ")
}

/// The status after a pass. Counts come from the pass (a degraded pass keeps the last known
/// counts); Ready, Progressing, Degraded, Reconciling and Stalled are always all present, each
/// keeping its transition time while unchanged, so an unchanged state gives an identical status.
pub fn next_status(old: &StoreClusterStatus, generation: Option<i64>, observation: Observation) -> StoreClusterStatus {
    let (mut new, phase, ready, degraded) = match observation {
        Observation::Paused => {
            (old.clone(), "Paused", (false, "Paused".to_string(), "reconciling is paused".to_string()), None)
        }
        Observation::Pass(Outcome { degraded: Some((reason, message)), .. }) => (
            old.clone(),
            "Degraded",
            (false, reason.to_string(), message.clone()),
            Some((reason.to_string(), message.clone())),
        ),
        Observation::Pass(outcome) if outcome.ready => {
            let s = &outcome.status;
            let message = format!("{} datanodes, {} partitions", s.nodes_total, s.partitions.total);
            (outcome.status.clone(), "Ready", (true, "Converged".into(), message), None)
        }
        Observation::Pass(outcome) => {
            // "Creating" until the cluster was first ready; afterwards changes are "Updating".
            let phase = if old.phase.is_empty() || old.phase == "Creating" { "Creating" } else { "Updating" };
            (outcome.status.clone(), phase, (false, "Progressing".into(), progress_message(outcome)), None)
        }
    };
    new.phase = phase.into();
    new.observed_generation = generation;
    let previous = &old.conditions;
    let condition = |type_: &str, on: bool, reason: &str, message: String| {
        cairn_resources::condition(previous, type_, on, reason, message, generation)
    };
    let (ready_on, ready_reason, ready_message) = ready;
    let progressing = !ready_on && degraded.is_none() && phase != "Paused";
    // kstatus reads the "abnormal-true" pair: Reconciling (work under way) and Stalled (no progress
    // without someone's help); Progressing and Degraded say the same for readers of the
    // Deployment-style pair.
    let (progress_reason, progress_message) =
        if progressing { ("Reconciling", ready_message.clone()) } else { ("Idle", String::new()) };
    let (degraded_on, degraded_reason, degraded_message) = match &degraded {
        Some((reason, message)) => (true, reason.as_str(), message.clone()),
        None => (false, "Healthy", String::new()),
    };
    new.conditions = vec![
        condition("Ready", ready_on, &ready_reason, ready_message),
        condition("Progressing", progressing, progress_reason, progress_message.clone()),
        condition("Degraded", degraded_on, degraded_reason, degraded_message.clone()),
        condition("Reconciling", progressing, progress_reason, progress_message),
        condition("Stalled", degraded_on, degraded_reason, degraded_message),
    ];
    new
}

/// Events for a pass: `Reconciled` when it changed something, and a Warning the first time a
/// Degraded reason appears (not once per retry).
pub fn notes(old: &StoreClusterStatus, outcome: &Outcome) -> Vec<Note> {
    if let Some((reason, message)) = &outcome.degraded {
        let already = old.conditions.iter().any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == *reason);
        return if already {
            Vec::new()
        } else {
            vec![Note { warning: true, reason: reason.to_string(), action: "Reconcile", message: message.clone() }]
        };
    }
    let mut notes = Vec::new();
    if !outcome.changes.is_empty() {
        let mut message = outcome.changes.join("; ");
        if !outcome.progress.is_empty() {
            message += &format!(" ({})", outcome.progress.join("; "));
        }
        notes.push(Note { warning: false, reason: "Reconciled".into(), action: "Apply", message });
    }
    let was_ready = old.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    if outcome.ready && !was_ready {
        let s = &outcome.status;
        let message = format!("{} datanodes, {} partitions", s.nodes_total, s.partitions.total);
        notes.push(Note { warning: false, reason: "Ready".into(), action: "Reconcile", message });
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ready: bool, degraded: Option<(&'static str, &str)>) -> Outcome {
        let mut status = StoreClusterStatus { nodes_ready: 2, nodes_total: 3, ..Default::default() };
        status.partitions.total = 6;
        status.partitions.under_replicated = 1;
        Outcome {
            status,
            ready,
            changes: vec!["started datanode n1".into()],
            degraded: degraded.map(|(r, m)| (r, m.to_string())),
            progress: vec!["draining n3: 2 replica(s) still to move".into()],
        }
    }

    fn condition<'a>(
        s: &'a StoreClusterStatus,
        type_: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn progressing_then_ready_then_updating_keeps_transition_times() {
        let first = next_status(&StoreClusterStatus::default(), Some(1), Observation::Pass(&outcome(false, None)));
        assert_eq!(first.phase, "Creating");
        let ready = condition(&first, "Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message,
            "2/3 datanodes live; 1 partition(s) under-replicated; draining n3: 2 replica(s) still to move"
        );
        assert_eq!(condition(&first, "Progressing").status, "True");
        // The same observation again: an identical status (no write).
        assert_eq!(next_status(&first, Some(1), Observation::Pass(&outcome(false, None))), first);

        let done = next_status(&first, Some(1), Observation::Pass(&outcome(true, None)));
        assert_eq!((done.phase.as_str(), condition(&done, "Ready").status.as_str()), ("Ready", "True"));
        assert_eq!(
            condition(&done, "Degraded").last_transition_time,
            condition(&first, "Degraded").last_transition_time,
            "Degraded stayed False"
        );
        let later = next_status(&done, Some(2), Observation::Pass(&outcome(false, None)));
        assert_eq!(later.phase, "Updating");
        assert_eq!(later.observed_generation, Some(2));
    }

    #[test]
    fn degraded_keeps_counts_and_warns_once() {
        let ready = next_status(&StoreClusterStatus::default(), Some(1), Observation::Pass(&outcome(true, None)));
        let bad = outcome(false, Some(("EtcdUnreachable", "etcd [x] unreachable")));
        let degraded = next_status(&ready, Some(1), Observation::Pass(&bad));
        assert_eq!(degraded.phase, "Degraded");
        assert_eq!(degraded.partitions.total, 6, "last known counts kept");
        let d = condition(&degraded, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "EtcdUnreachable"));
        assert_eq!(condition(&degraded, "Progressing").status, "False");
        let first = notes(&ready, &bad);
        assert_eq!(first.len(), 1);
        assert!(first[0].warning);
        assert!(notes(&degraded, &bad).is_empty(), "once per reason, not per retry");
    }

    #[test]
    fn notes_name_the_changes_and_the_first_ready() {
        let n = notes(&StoreClusterStatus::default(), &outcome(true, None));
        let reasons: Vec<&str> = n.iter().map(|n| n.reason.as_str()).collect();
        assert_eq!(reasons, ["Reconciled", "Ready"]);
        assert_eq!(n[0].message, "started datanode n1 (draining n3: 2 replica(s) still to move)");
        let paused = next_status(&StoreClusterStatus::default(), None, Observation::Paused);
        assert_eq!(paused.phase, "Paused");
        assert_eq!(condition(&paused, "Progressing").status, "False");
    }
}

//! The id of the request being served, so that one request can be followed through the logs of
//! every node it touches: taken from the client's `X-Request-Id` (when it is a sane token) or
//! made up, answered back, logged in the request's span, and sent on every replica call the
//! router makes for it (a batch of replica writes carries the ids of its blobs, comma-separated).

use std::future::Future;

pub const HEADER: &str = "x-request-id";

/// Longest id taken from a client (or a batch's list of ids from a peer).
const MAX_LEN: usize = 4096;

tokio::task_local! {
    static ID: String;
}

/// Runs `f` as part of request `id`.
pub async fn scope<F: Future>(id: String, f: F) -> F::Output {
    ID.scope(id, f).await
}

/// Runs `f` as part of the request `id` if there is one.
pub async fn maybe_scope<F: Future>(id: Option<String>, f: F) -> F::Output {
    match id {
        Some(id) => ID.scope(id, f).await,
        None => f.await,
    }
}

/// The request this task serves, if any.
pub fn current() -> Option<String> {
    ID.try_with(Clone::clone).ok()
}

/// The id a client gave, if it is one (letters, digits, `-_.:,`, not too long), else a new one.
pub fn id_from(given: Option<&str>) -> String {
    let sane = |id: &&str| {
        !id.is_empty() && id.len() <= MAX_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:,".contains(&b))
    };
    given.filter(sane).map(str::to_owned).unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_id_is_kept_and_anything_else_replaced() {
        assert_eq!(id_from(Some("req-42_a.b:c,d")), "req-42_a.b:c,d");
        for bad in [None, Some(""), Some("a b"), Some("x\u{1}"), Some("<script>")] {
            let id = id_from(bad);
            assert_eq!(id.len(), 16, "{bad:?} → {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(id_from(Some(&"a".repeat(MAX_LEN + 1))), "a".repeat(MAX_LEN + 1));
    }

    #[tokio::test]
    async fn the_id_is_the_scopes() {
        assert_eq!(current(), None);
        assert_eq!(scope("r1".into(), async { current() }).await.as_deref(), Some("r1"));
        assert_eq!(maybe_scope(None, async { current() }).await, None);
    }
}

//! Server-side apply's field ownership, as [`MemoryApi`](crate::MemoryApi) models it: each field
//! manager owns the fields it applied; a field it stops sending is removed (unless another manager
//! owns it too); applying a field another manager owns with a different value is a 409 conflict
//! unless forced, and forcing takes the field over. Lists are owned whole (atomic), which is
//! stricter than the API server's keyed lists about removal and looser about conflicts.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Who owns which fields of one object: manager → JSON pointers of the leaves it applied.
pub type Owners = BTreeMap<String, BTreeSet<String>>;

/// The leaves of `value` (scalars, lists, empty objects) by JSON pointer, without the identity
/// fields every apply carries.
pub fn leaves(value: &Value) -> BTreeMap<String, Value> {
    fn walk(value: &Value, path: String, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    walk(v, format!("{path}/{}", k.replace('~', "~0").replace('/', "~1")), out);
                }
            }
            _ => {
                out.insert(path, value.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(value, String::new(), &mut out);
    for identity in ["/apiVersion", "/kind", "/metadata/name", "/metadata/namespace"] {
        out.remove(identity);
    }
    out
}

/// Applies `patch` to `object` as `manager`: conflicts first (409 unless `force`), then the
/// fields this manager applied before and no longer sends are removed, then the patch merged.
pub fn apply(object: &mut Value, patch: &Value, manager: &str, force: bool, owners: &mut Owners) -> Result<(), String> {
    let sent = leaves(patch);
    let mut conflicts = Vec::new();
    for (path, value) in &sent {
        for (other, fields) in owners.iter() {
            if other != manager && fields.contains(path) && object.pointer(path) != Some(value) {
                conflicts.push(format!("conflict with \"{other}\": {path}"));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(format!("Apply failed with {} conflict(s): {}", conflicts.len(), conflicts.join("; ")));
    }
    if force {
        for (other, fields) in owners.iter_mut() {
            if other != manager {
                fields.retain(|p| !sent.contains_key(p));
            }
        }
    }
    let before = owners.remove(manager).unwrap_or_default();
    for path in before.iter().filter(|p| !sent.contains_key(*p)) {
        if owners.values().any(|fields| fields.contains(path)) {
            continue;
        }
        remove(object, path);
    }
    json_patch::merge(object, patch);
    owners.insert(manager.to_owned(), sent.into_keys().collect());
    owners.retain(|_, fields| !fields.is_empty());
    Ok(())
}

/// Removes the field at `pointer`, and the objects it leaves empty.
fn remove(object: &mut Value, pointer: &str) {
    let Some((parent, key)) = pointer.rsplit_once('/') else { return };
    let key = key.replace("~1", "/").replace("~0", "~");
    let Some(map) = object.pointer_mut(parent).and_then(Value::as_object_mut) else { return };
    map.remove(&key);
    if map.is_empty() && !parent.is_empty() {
        remove(object, parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_a_manager_stops_sending_go_and_conflicts_need_force() {
        let mut object = json!({});
        let mut owners = Owners::new();
        let first = json!({"spec": {"maxUnavailable": 1, "selector": {"a": "b"}}});
        apply(&mut object, &first, "op", false, &mut owners).unwrap();
        let second = json!({"spec": {"minAvailable": 2, "selector": {"a": "b"}}});
        apply(&mut object, &second, "op", false, &mut owners).unwrap();
        assert_eq!(object, json!({"spec": {"minAvailable": 2, "selector": {"a": "b"}}}), "maxUnavailable removed");
        // Another manager's field: kept when op stops sending its own.
        apply(&mut object, &json!({"metadata": {"labels": {"team": "x"}}}), "user", false, &mut owners).unwrap();
        apply(&mut object, &json!({"spec": {"minAvailable": 2}}), "op", false, &mut owners).unwrap();
        assert_eq!(object["metadata"]["labels"]["team"], "x");
        assert!(object["spec"].get("selector").is_none(), "op's selector removed with its empty parent");
        // A different value for a field someone else owns: 409 unless forced.
        let err = apply(&mut object, &json!({"metadata": {"labels": {"team": "y"}}}), "op", false, &mut owners);
        assert!(err.unwrap_err().contains("conflict with \"user\""));
        apply(&mut object, &json!({"metadata": {"labels": {"team": "y"}}}), "op", true, &mut owners).unwrap();
        assert_eq!(object["metadata"]["labels"]["team"], "y");
        assert!(!owners.contains_key("user"), "forced: op owns it now");
        // The same value is shared ownership, no conflict.
        apply(&mut object, &json!({"metadata": {"labels": {"team": "y"}}}), "user", false, &mut owners).unwrap();
    }
}

//! Label selectors as Kubernetes evaluates them (`metav1.LabelSelector`, and a node selector
//! term's `matchExpressions`), one implementation for every place the test API and the simulated
//! kubelet select objects.

use serde_json::Value;

/// Whether `labels` (a JSON object) meet one requirement: `{key, operator, values}` with In,
/// NotIn, Exists, DoesNotExist, and (node selectors) Gt and Lt.
pub fn requirement_matches(labels: &Value, requirement: &Value) -> bool {
    let have = labels[requirement["key"].as_str().unwrap_or_default()].as_str();
    let values: Vec<&str> = requirement["values"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let number = |v: Option<&str>| v.and_then(|v| v.parse::<i64>().ok());
    match requirement["operator"].as_str() {
        Some("In") => have.is_some_and(|h| values.contains(&h)),
        Some("NotIn") => have.is_none_or(|h| !values.contains(&h)),
        Some("Exists") => have.is_some(),
        Some("DoesNotExist") => have.is_none(),
        Some("Gt") => number(have).zip(number(values.first().copied())).is_some_and(|(h, v)| h > v),
        Some("Lt") => number(have).zip(number(values.first().copied())).is_some_and(|(h, v)| h < v),
        _ => false,
    }
}

/// Whether `labels` match a LabelSelector (`matchLabels` and `matchExpressions`, all of them);
/// an empty selector matches everything.
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"].as_object().into_iter().flatten().all(|(k, v)| &labels[k] == v)
        && selector["matchExpressions"].as_array().into_iter().flatten().all(|e| requirement_matches(labels, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match_as_kubernetes_does() {
        let labels = json!({"app": "db", "tier": "2"});
        assert!(selector_matches(&json!({}), &labels), "empty selects all");
        assert!(selector_matches(&json!({"matchLabels": {"app": "db"}}), &labels));
        assert!(!selector_matches(&json!({"matchLabels": {"app": "web"}}), &labels));
        let expr =
            |op: &str, values: Value| json!({"matchExpressions": [{"key": "tier", "operator": op, "values": values}]});
        assert!(selector_matches(&expr("In", json!(["1", "2"])), &labels));
        assert!(!selector_matches(&expr("NotIn", json!(["2"])), &labels));
        assert!(selector_matches(&expr("Exists", json!([])), &labels));
        assert!(!selector_matches(&expr("DoesNotExist", json!([])), &labels));
        assert!(selector_matches(&expr("Gt", json!(["1"])), &labels));
        assert!(!selector_matches(&expr("Lt", json!(["1"])), &labels));
        assert!(selector_matches(
            &json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}),
            &labels
        ));
    }
}

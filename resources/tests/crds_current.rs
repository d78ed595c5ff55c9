//! crds/ is generated; this fails when someone changed a type and forgot to regenerate.

#[test]
fn crds_dir_matches_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, yaml) in cairn_resources::crds() {
        let on_disk = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            on_disk == yaml,
            "crds/{name} is stale: run `cargo run -p cairn-operator --bin cairn-operator -- crdgen crds`"
        );
    }
}

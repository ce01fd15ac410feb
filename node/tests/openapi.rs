//! The OpenAPI document that `fluxmesh openapi` prints (and every node
//! serves at `/api/v1/openapi.json`) is a valid OpenAPI 3.1 document, by a
//! validator we did not write: `openapi-spec-validator`, which
//! `deploy/local/test` installs in `.local/venv`. That every route is in
//! it is checked by the unit tests of `fluxmesh_node::http`.

use std::process::Command;

#[test]
fn the_openapi_document_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_fluxmesh")).arg("openapi").output().expect("run fluxmesh openapi");
    assert!(out.status.success(), "fluxmesh openapi failed: {}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.contains_key("/api/v1/rules/{id}") && paths.contains_key("/api/v1/openapi.json"), "{paths:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &out.stdout).expect("write the document");
    let validator = std::env::var_os("FM_OPENAPI_VALIDATOR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| fluxmesh_testkit::workspace_root().join(".local/venv/bin/openapi-spec-validator"));
    assert!(
        validator.is_file(),
        "{} is missing: run deploy/local/test, which installs openapi-spec-validator",
        validator.display()
    );
    let checked = Command::new(&validator).arg(&file).output().expect("run openapi-spec-validator");
    assert!(
        checked.status.success(),
        "openapi-spec-validator refuses the document: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

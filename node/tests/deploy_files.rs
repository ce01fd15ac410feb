//! The node configs the deployment files ship are ones the node accepts:
//! `fluxmesh check-config` (the binary) on the Kubernetes ConfigMap's
//! `node.toml`, with the variables the Deployment sets from its Secrets.

use std::path::Path;
use std::process::Command;

/// The block scalar `key: |` of a YAML manifest, its indentation removed:
/// the lines after it that are blank or indented deeper than `key`.
fn block_scalar(yaml: &str, key: &str) -> Option<String> {
    let mut lines = yaml.lines();
    let header = lines.by_ref().find(|l| l.trim_start() == format!("{key}: |"))?;
    let key_indent = header.len() - header.trim_start().len();
    let mut body = Vec::new();
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && indent <= key_indent {
            break;
        }
        body.push(line);
    }
    let indent = body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min()?;
    Some(body.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n") + "\n")
}

fn check_config(toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, toml).expect("write node.toml");
    Command::new(env!("CARGO_BIN_EXE_fluxmesh"))
        .arg("check-config")
        .arg(&file)
        // What the Deployment sets; nothing else from this environment.
        .env_clear()
        .env("FLUXMESH_NODE_ID", "fluxmesh-7d9f8c6b5-x2x7q")
        .env("FLUXMESH_NATS_PASSWORD", "from-the-fluxmesh-nats-secret")
        .env("FLUXMESH_AUTH_ADMIN_TOKEN", "from-the-fluxmesh-admin-secret")
        .env("FLUXMESH_STORAGE_PRIMARY", "postgres://fluxmesh:pw@pg-1,pg-2/fluxmesh?target_session_attrs=read-write")
        .env("FLUXMESH_STORAGE_REPLICAS", r#"["postgres://fluxmesh:pw@pg-2/fluxmesh"]"#)
        .output()
        .expect("run fluxmesh check-config")
}

#[test]
fn the_kubernetes_configmap_is_a_valid_node_config() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/fluxmesh.yaml");
    let yaml = std::fs::read_to_string(&manifest).expect("deploy/kubernetes/fluxmesh.yaml");
    let toml = block_scalar(&yaml, "node.toml").expect("a node.toml block in the ConfigMap");
    assert!(toml.contains("[mqtt]") && toml.contains("urls = ["), "not the whole block:\n{toml}");

    let out = check_config(&toml);
    assert!(
        out.status.success(),
        "check-config refused the ConfigMap's node.toml ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The same check refuses a misspelt key: it is not a check that passes
    // whatever it is given.
    let out = check_config(&toml.replace("ws_enabled", "ws_enable"));
    assert_eq!(out.status.code(), Some(2), "a misspelt key must be refused");
}

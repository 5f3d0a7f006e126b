//! `--cluster` reads through kube-rs and the current kubeconfig; there is no cluster here,
//! so this checks that every failed read is an error naming the namespace, never a
//! fallback to default ids. One test, because it sets KUBECONFIG for the whole process.

use std::net::TcpListener;

use kiln_kube::{namespace_from_cluster, KubeError};

fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
         clusters:\n- name: test\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
         users:\n- name: test\n  user:\n    token: not-a-real-token\n"
    )
}

#[test]
fn failed_cluster_reads_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A loopback port with nothing listening: bind to learn a free one, then close it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = dir.path().join("unreachable.yaml");
    std::fs::write(
        &unreachable,
        kubeconfig(&format!("https://127.0.0.1:{port}")),
    )
    .unwrap();
    let missing = dir.path().join("missing.yaml");
    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "this: [is not a kubeconfig").unwrap();

    for config in [&unreachable, &missing, &garbage] {
        std::env::set_var("KUBECONFIG", config);
        let err = namespace_from_cluster("team-a").unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, KubeError::Cluster { ref namespace, .. } if namespace == "team-a"),
            "{message}"
        );
        assert!(
            message.starts_with("reading namespace \"team-a\" from the cluster"),
            "{message}"
        );
        eprintln!("{}: {message}", config.display());
    }
}

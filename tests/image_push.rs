//! kiln-image's writing side against real tools: an image taken from kiln's store is
//! pushed (layers streamed from the store's files) to a real `docker-registry`, anonymous
//! and behind htpasswd; skopeo and `kiln pull` read back the same manifest.

use std::process::Command;
use std::time::Duration;

use kiln_e2e::{fixtures, require_root, run_ok, KilnRoot, Registry};
use kiln_image::{ImageRef, OciImage, PullOptions, PushOptions, Store};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(300);

fn skopeo_digest(registry: &Registry, image: &str, creds: Option<&str>) -> String {
    let mut command = Command::new("skopeo");
    command
        .args(["inspect", "--tls-verify=false", "--authfile"])
        .arg(registry.empty_auth_file());
    if let Some(creds) = creds {
        command.arg(format!("--creds={creds}"));
    }
    let info: Value = serde_json::from_slice(&run_ok(command.arg(image), TIMEOUT).stdout).unwrap();
    info["Digest"].as_str().unwrap().to_owned()
}

/// The demo fixture pulled from its OCI layout into a fresh store.
fn stored_demo(root: &std::path::Path) -> (Store, kiln_image::PulledImage) {
    let demo = fixtures().demo();
    let store = Store::open(root).unwrap();
    let reference = ImageRef::parse(&format!(
        "oci:{}:{}",
        demo.oci_gzip.path.display(),
        demo.oci_gzip.tag
    ))
    .unwrap();
    let pulled = kiln_image::pull(&store, &reference, &PullOptions::default()).unwrap();
    (store, pulled)
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn stored_image_pushes_and_pulls_back_unchanged() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (store, pulled) = stored_demo(&work.path().join("root"));
    let image = OciImage::from_store(&store, &pulled).unwrap();
    assert_eq!(image.manifest_digest(), &pulled.record.manifest_digest);

    let registry = Registry::start(None);
    let target =
        kiln_image::DockerRef::parse(&format!("{}/kiln/pushed:v1", registry.addr())).unwrap();
    let digest = kiln_image::push(&image, &target, &PushOptions::default()).unwrap();
    assert_eq!(&digest, image.manifest_digest());
    assert_eq!(
        skopeo_digest(&registry, &registry.docker_ref("kiln/pushed:v1"), None),
        digest.to_string()
    );

    // Pulled back by kiln into an empty store: every blob verified again on the way in.
    let back = KilnRoot::without_guest();
    let stdout = back.ok(&["pull", &registry.docker_ref("kiln/pushed:v1")]);
    assert_eq!(
        stdout.split_whitespace().last(),
        Some(digest.to_string().as_str()),
        "{stdout}"
    );

    // Pushing again finds every blob there and only tags the manifest.
    let retag =
        kiln_image::DockerRef::parse(&format!("{}/kiln/pushed:v2", registry.addr())).unwrap();
    assert_eq!(
        kiln_image::push(&image, &retag, &PushOptions::default()).unwrap(),
        digest
    );
    assert_eq!(
        skopeo_digest(&registry, &registry.docker_ref("kiln/pushed:v2"), None),
        digest.to_string()
    );

    // A digest is no push target.
    let by_digest =
        kiln_image::DockerRef::parse(&format!("{}/kiln/pushed@{digest}", registry.addr())).unwrap();
    let err = kiln_image::push(&image, &by_digest, &PushOptions::default()).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("give a tag"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn push_to_an_htpasswd_registry_needs_its_credentials() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (store, pulled) = stored_demo(&work.path().join("root"));
    let image = OciImage::from_store(&store, &pulled).unwrap();
    let registry = Registry::start(Some(("kiln", "s3cret")));
    let target =
        kiln_image::DockerRef::parse(&format!("{}/kiln/private:v1", registry.addr())).unwrap();
    let with = |creds: &str| PushOptions {
        creds: Some(creds.to_owned()),
        insecure_registries: Vec::new(),
    };

    let err = kiln_image::push(&image, &target, &with("kiln:wrong"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&registry.addr()) && err.contains("refused the credentials from --creds"),
        "{err}"
    );
    let digest = kiln_image::push(&image, &target, &with("kiln:s3cret")).unwrap();
    let source = registry.docker_ref("kiln/private:v1");
    assert_eq!(
        skopeo_digest(&registry, &source, Some("kiln:s3cret")),
        digest.to_string()
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn push_to_a_token_auth_registry_gets_a_push_token() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let (store, pulled) = stored_demo(&work.path().join("root"));
    let image = OciImage::from_store(&store, &pulled).unwrap();
    let registry = Registry::start_token_auth("kiln", "t0ken");
    let target =
        kiln_image::DockerRef::parse(&format!("{}/kiln/token:v1", registry.addr())).unwrap();

    let anonymous = kiln_image::push(&image, &target, &PushOptions::default()).unwrap_err();
    assert!(
        anonymous.to_string().contains("no credentials were found"),
        "{anonymous}"
    );
    let options = PushOptions {
        creds: Some("kiln:t0ken".to_owned()),
        insecure_registries: Vec::new(),
    };
    let digest = kiln_image::push(&image, &target, &options).unwrap();
    let source = registry.docker_ref("kiln/token:v1");
    assert_eq!(
        skopeo_digest(&registry, &source, Some("kiln:t0ken")),
        digest.to_string()
    );
    let issued = registry.token_server().unwrap().issued();
    assert!(
        issued
            .iter()
            .any(|t| t == "kiln repository:kiln/token:pull,push"),
        "no push token for kiln's user: {issued:?}"
    );
}

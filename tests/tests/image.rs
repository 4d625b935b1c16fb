//! The container image builds and its binary runs, where an image builder is available. This
//! machine kind has the docker client but no engine; then the test says so and does nothing.

use std::path::PathBuf;
use std::process::Command;

fn builder() -> Option<&'static str> {
    ["docker", "podman"]
        .into_iter()
        .find(|tool| Command::new(tool).arg("info").output().is_ok_and(|out| out.status.success()))
}

#[test]
fn image_builds_where_a_builder_is_present() {
    let Some(tool) = builder() else {
        eprintln!("no working docker or podman engine: image build not attempted");
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tag = format!("lb:test-{}", std::process::id());
    let status = Command::new(tool).args(["build", "-t", &tag, "."]).current_dir(&root).status().unwrap();
    assert!(status.success(), "{tool} build failed");
    let out = Command::new(tool).args(["run", "--rm", &tag, "--version"]).output().unwrap();
    let _ = Command::new(tool).args(["rmi", &tag]).status();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lb "), "{out:?}");
}

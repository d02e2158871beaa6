//! Container images for the tests, built locally (no image can be pulled here) once per test
//! process and cached by tag: the FROM-scratch agent image (`scripts/build-image.sh`) and a
//! FROM-scratch busybox. Podman is installed and configured first if it is missing, with the
//! settings of `scripts/static-common.sh` (runc, cgroupfs, explicit ulimits).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The agent image's tag.
pub const AGENT_IMAGE: &str = "localhost/wisp-agent:dev";
/// The busybox image's tag: `/bin/busybox` from busybox-static, with `/bin/sh` linked to it.
pub const BUSYBOX_IMAGE: &str = "localhost/wisp-busybox:test";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Panic with what to do unless podman runs containers here. Installs podman, runc and
/// busybox-static (apt-get) and writes /etc/containers/containers.conf when they are missing, as
/// `scripts/build-image.sh` does, which needs root.
pub fn require_podman() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        super::require_root();
        let out = Command::new("bash")
            .args([
                "-c",
                "set -euo pipefail; source scripts/static-common.sh; WISP_CONTAINER_ENGINE= container_engine",
            ])
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        let engine = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || engine != "podman" {
            return Err(format!("setting up podman failed (engine '{engine}'): {}", text(&out)));
        }
        let out = Command::new("podman")
            .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
            .output()
            .map_err(|e| format!("cannot run podman: {e}"))?;
        if !out.status.success() {
            return Err(format!("`podman info` failed: {}", text(&out)));
        }
        Ok(())
    });
    if let Err(e) = ready {
        panic!(
            "these tests need a working podman (as root, with runc and cgroupfs as scripts/static-common.sh \
             configures it): {e}"
        );
    }
}

/// `localhost/wisp-agent:dev`, built once per test process from this checkout: the static agent
/// first (`scripts/build-static.sh`, incremental: quick when nothing changed, minutes the first
/// time), then the image (`scripts/build-image.sh`), so the image always holds the agent the tests
/// were built from.
pub fn agent_image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        require_podman();
        let target = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
        for script in [
            vec!["scripts/build-static.sh", target.as_str()],
            vec!["scripts/build-image.sh", "--tag", AGENT_IMAGE],
        ] {
            let out = Command::new("bash")
                .args(&script)
                .current_dir(repo())
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run bash: {e}"))?;
            if !out.status.success() {
                return Err(format!("{}: {}", script.join(" "), text(&out)));
            }
        }
        Ok(())
    });
    if let Err(e) = built {
        panic!("building {AGENT_IMAGE} failed: {e}");
    }
    AGENT_IMAGE
}

/// `localhost/wisp-busybox:test`, built FROM scratch once per test process by
/// `scripts/build-busybox-image.sh` (static busybox as /bin/sh, with its applets linked).
pub fn busybox_image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        require_podman();
        let out = Command::new("bash")
            .args(["scripts/build-busybox-image.sh", "--tag", BUSYBOX_IMAGE])
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(text(&out))
        }
    });
    if let Err(e) = built {
        panic!("building {BUSYBOX_IMAGE} failed: {e}");
    }
    BUSYBOX_IMAGE
}

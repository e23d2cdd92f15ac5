//! A real systemd, booted as PID 1 of private PID, mount, network, UTS and IPC namespaces
//! (`unshare`), driven with `systemctl` through `nsenter`. Needs root. Dropping it SIGKILLs the
//! namespace's PID 1, which takes every process of the namespace with it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{binaries, eventually};

const SYSTEMD: &str = "/lib/systemd/systemd";

/// A booted systemd.
#[derive(Debug)]
pub struct Systemd {
    /// PID 1 of the namespace, as seen from outside.
    pub pid: u32,
    unshare: Child,
    /// Files shared with the namespace.
    pub dir: PathBuf,
}

/// Fails, saying what to install, if the machine cannot run these tests.
pub fn require() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "systemd tests need root (CI runs as root)"
    );
    let unshare = Command::new("unshare")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(unshare, "`unshare` is missing: apt-get install util-linux");
    let nsenter = Command::new("nsenter")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(nsenter, "`nsenter` is missing: apt-get install util-linux");
    assert!(
        Path::new(SYSTEMD).exists(),
        "{SYSTEMD} is missing: apt-get install systemd"
    );
}

impl Systemd {
    /// The directory shared with the namespace of [`Systemd::boot`]`(name, ..)`: put files the
    /// units need there first. (The namespace gets a /run of its own, and shares the rest of the
    /// file system: the checkout, and so the binaries under test, may be anywhere, /tmp too.)
    pub fn workdir(name: &str) -> PathBuf {
        let target = binaries()
            .baton
            .parent()
            .and_then(Path::parent)
            .expect("target dir");
        let dir = target
            .join("tmp")
            .join(format!("systemd-{name}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("units")).unwrap();
        dir
    }

    /// Boots systemd with `units` (file name, contents) installed in /run/systemd/system.
    pub fn boot(name: &str, units: &[(&str, String)]) -> Systemd {
        require();
        let dir = Self::workdir(name);
        for (file, text) in units {
            std::fs::write(dir.join("units").join(file), text).unwrap();
        }
        let script = dir.join("boot.sh");
        let target = binaries()
            .baton
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        std::fs::write(
            &script,
            format!(
                r#"#!/bin/sh
set -e
# Everything mounted here stays in this namespace.
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t proc proc /proc
# A /tmp of its own. If the build lives under /tmp, bring its target directory back.
mkdir -p /run/host-tmp
mount --bind /tmp /run/host-tmp
mount -t tmpfs tmpfs /tmp
case "{target}" in
  /tmp/*) mkdir -p "{target}"; mount --bind "/run/host-tmp/${{TARGET_REL}}" "{target}" ;;
esac
mkdir -p /run/systemd/system
cp {units}/* /run/systemd/system/ 2>/dev/null || true
# Nothing the tests start may pull early boot (sysinit.target) ...
for unit in /run/systemd/system/*.service /run/systemd/system/*.socket; do
  [ -f "$unit" ] || continue
  mkdir -p "$unit.d"
  printf '[Unit]\nDefaultDependencies=no\n' > "$unit.d/baton-test.conf"
done
# ... and, should anything still ask for them, these units of the host's early boot are masked:
# they would clean /tmp, set kernel sysctls, write the host's /var.
for unit in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
    systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer systemd-sysctl.service \
    systemd-random-seed.service systemd-update-utmp.service systemd-update-utmp-runlevel.service \
    systemd-modules-load.service systemd-remount-fs.service systemd-sysusers.service \
    systemd-binfmt.service systemd-journal-flush.service systemd-machine-id-commit.service \
    systemd-hwdb-update.service systemd-udev-trigger.service systemd-udevd.service \
    systemd-firstboot.service ldconfig.service sysinit.target; do
  ln -sf /dev/null "/run/systemd/system/$unit"
done
cat > /run/systemd/system/baton-test.target <<'UNIT'
[Unit]
Description=baton test target
DefaultDependencies=no
UNIT
export container=baton-test
exec {SYSTEMD} --system --unit=baton-test.target --log-target=console --log-level=notice
"#,
                units = dir.join("units").display(),
                target = target.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("systemd.log")).unwrap();
        let target_rel = target
            .strip_prefix("/tmp")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--net",
                "--uts",
                "--ipc",
                "sh",
            ])
            .arg(&script)
            .env("TARGET_REL", target_rel)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting unshare");
        let parent = unshare.id();
        let pid = eventually(
            Duration::from_secs(10),
            "systemd to start in the namespace",
            || {
                let children =
                    std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                        .ok()?;
                let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                (comm.trim() == "systemd").then_some(pid)
            },
        );
        let systemd = Systemd { pid, unshare, dir };
        eventually(Duration::from_secs(30), "systemd to finish booting", || {
            let out = systemd.systemctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            matches!(state.as_str(), "running" | "degraded").then_some(())
        });
        systemd
    }

    /// A command run inside every namespace of the booted system.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid.to_string(), "-a", program]);
        cmd
    }

    /// A command run in the namespace's network only (for clients of its loopback).
    pub fn net_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid.to_string(), "-n"]).arg(program);
        cmd
    }

    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.command("systemctl")
            .args(args)
            .output()
            .expect("running systemctl")
    }

    /// `systemctl show -p NAME --value UNIT`.
    pub fn show(&self, unit: &str, property: &str) -> String {
        let out = self.systemctl(&["show", "-p", property, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The unit's journal so far (for failure messages).
    pub fn journal(&self, unit: &str) -> String {
        let out = self
            .command("journalctl")
            .args(["-u", unit, "--no-pager", "-o", "cat"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
            + &std::fs::read_to_string(self.dir.join("systemd.log")).unwrap_or_default()
    }

    /// Runs the load generator inside the namespace's network: `loadgen ARGS...`.
    pub fn loadgen(&self, args: &[&str]) -> Child {
        self.net_command(&binaries().loadgen)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting loadgen")
    }

    /// Inodes of the TCP sockets listening on `port` inside the namespace.
    pub fn listening_inodes(&self, port: u16) -> Vec<u64> {
        let out = self
            .command("cat")
            .args(["/proc/net/tcp", "/proc/net/tcp6"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let local = u16::from_str_radix(cols.get(1)?.rsplit(':').next()?, 16).ok()?;
                (cols.get(3) == Some(&"0A") && local == port).then(|| cols.get(9)?.parse().ok())?
            })
            .collect()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        // PID 1 of a PID namespace ignores SIGTERM; SIGKILL ends it and all of the namespace.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// The packaged `baton.service`, pointed at the test build and `config`.
pub fn service_unit(config: &Path) -> String {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/systemd/baton.service"
    ))
    .unwrap();
    assert!(unit.contains("/usr/bin/baton") && unit.contains("/etc/baton/baton.yaml"));
    unit.replace("/usr/bin/baton", &binaries().baton.display().to_string())
        .replace("/etc/baton/baton.yaml", &config.display().to_string())
}

//! A real systemd, booted as PID 1 of private PID, mount, network, UTS, IPC and cgroup
//! namespaces (`unshare`), driven with `systemctl` through `nsenter`. Needs root. Dropping it
//! SIGKILLs the namespace's PID 1, which takes every process of the namespace with it, then
//! removes the cgroups it made.
//!
//! Each booted systemd gets cgroups of its own (a fresh directory in every hierarchy systemd
//! uses, made the root of a cgroup namespace, and the cgroup file systems mounted again inside
//! it). Without them, every systemd booted by a parallel test put its `baton.service` in the
//! same host cgroup: one systemd saw another's processes there as PID 0, and systemd 252 fails
//! `systemctl kill` with "Input/output error" when it reads one (its `cg_read_pid`).
//! It also gets a journal of its own (a tmpfs on /var/log/journal): a test reading the journal
//! reads this boot's lines only, and the host's journal is left alone.

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
    /// Files shared with the namespace.
    pub dir: PathBuf,
    /// Held for its drop, which runs after `Systemd`'s.
    _namespace: Namespace,
}

/// What a boot leaves on the host, undone on drop even when the boot fails half-way: the
/// `unshare` process (killing it kills the namespace's PID 1: `--kill-child`), then the cgroups
/// made for the namespace (host paths).
#[derive(Debug)]
struct Namespace {
    unshare: Option<Child>,
    cgroups: Vec<PathBuf>,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Some(unshare) = &mut self.unshare {
            let _ = unshare.kill();
            let _ = unshare.wait();
        }
        for cgroup in &self.cgroups {
            if let Err(e) = remove_cgroup_tree(cgroup) {
                eprintln!("removing the test cgroup {}: {e}", cgroup.display());
            }
        }
    }
}

/// How the host mounts cgroups, as systemd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupLayout {
    /// cgroup2 at /sys/fs/cgroup.
    Unified,
    /// cgroup v1 controllers with a `name=systemd` hierarchy, cgroup2 at /sys/fs/cgroup/unified.
    Hybrid,
}

/// Fresh cgroups for one booted systemd, each inside this process's own cgroup of one hierarchy:
/// `(layout, [(directory, required)])`. Those of cgroup2 and of `name=systemd` are required;
/// those of v1 controllers are used where the host lets us (cpuset, for one, refuses a process
/// until its cpus are set), else the namespace's root for that controller stays the one this
/// process is in: systemd only tunes resources there, it tracks processes with the others.
fn make_cgroups(leaf: &str) -> (CgroupLayout, Vec<(PathBuf, bool)>) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    // Every cgroup mount: (mount point, root of the mount, fstype, super options).
    let mounts: Vec<(PathBuf, String, String, String)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split_whitespace().collect();
            let right: Vec<&str> = right.split_whitespace().collect();
            let fstype = *right.first()?;
            matches!(fstype, "cgroup" | "cgroup2").then(|| {
                Some((
                    PathBuf::from(left.get(4)?),
                    left.get(3)?.to_string(),
                    fstype.to_string(),
                    right.get(2)?.to_string(),
                ))
            })?
        })
        .collect();
    let unified_at_root = mounts
        .iter()
        .any(|(point, _, fstype, _)| fstype == "cgroup2" && point == Path::new("/sys/fs/cgroup"));
    let layout = if unified_at_root {
        CgroupLayout::Unified
    } else {
        CgroupLayout::Hybrid
    };
    let mut dirs = Vec::new();
    // One line `ID:CONTROLLERS:PATH` per hierarchy this process is in.
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let required = controllers.is_empty() || controllers == "name=systemd";
        let mount = mounts.iter().find(|(_, _, fstype, options)| {
            if controllers.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup"
                    && controllers
                        .split(',')
                        .all(|c| options.split(',').any(|o| o == c))
            }
        });
        let Some((point, root, _, _)) = mount else {
            assert!(
                !required,
                "no mount of the cgroup hierarchy {controllers:?}"
            );
            continue;
        };
        let relative = path.strip_prefix(root.as_str()).unwrap_or(path);
        let dir = point.join(relative.trim_start_matches('/')).join(leaf);
        match std::fs::create_dir_all(&dir) {
            Ok(()) => dirs.push((dir, required)),
            Err(e) if required => panic!("making the test cgroup {}: {e}", dir.display()),
            Err(_) => {}
        }
    }
    (layout, dirs)
}

/// Removes a cgroup and the ones systemd made inside it, deepest first. A cgroup whose last
/// process is still being reaped is busy for a moment: retried for a few seconds.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path())?;
            }
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(nix::libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
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
        let leaf = format!("baton-test-{}", dir.file_name().unwrap().to_string_lossy());
        let (layout, cgroups) = make_cgroups(&leaf);
        let mut namespace = Namespace {
            unshare: None,
            cgroups: cgroups.iter().map(|(dir, _)| dir.clone()).collect(),
        };
        let remount_cgroups = match layout {
            CgroupLayout::Unified => "mount -t cgroup2 cgroup2 /sys/fs/cgroup".to_string(),
            CgroupLayout::Hybrid => [
                "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup",
                "mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified",
                "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd",
                "mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified",
            ]
            .join("\n"),
        };
        let join_cgroups: String = cgroups
            .iter()
            .map(|(d, required)| {
                let fallback = if *required {
                    ""
                } else {
                    " 2>/dev/null || true"
                };
                format!("  echo $$ > {}/cgroup.procs{fallback}\n", d.display())
            })
            .collect();
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
if [ "$1" != in-cgroup-namespace ]; then
  # Cgroups of its own, made the root of a new cgroup namespace.
{join_cgroups}  exec unshare --cgroup sh "$0" in-cgroup-namespace
fi
# Everything mounted here stays in this namespace.
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t proc proc /proc
# The cgroup file systems again, rooted at this namespace's cgroups.
{remount_cgroups}
# A journal of its own.
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
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
# The journal, explicitly: the tests read the units' output from it (nothing else would start it
# reliably once early boot is cut away).
cat > /run/systemd/system/baton-test.target <<'UNIT'
[Unit]
Description=baton test target
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service
After=systemd-journald.socket systemd-journald.service
UNIT
export container=baton-test
# Its own messages into the journal the tests read: the console of a container goes nowhere, and
# with it the reasons a unit's process could not be started (226/NAMESPACE and the mount that
# failed, say), which the children systemd forks log before they run the program.
exec {SYSTEMD} --system --unit=baton-test.target --log-target=journal --log-level=notice
"#,
                units = dir.join("units").display(),
                target = target.display(),
                join_cgroups = join_cgroups,
                remount_cgroups = remount_cgroups,
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
        namespace.unshare = Some(unshare);
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
        // Its processes are in the cgroups made for it, not in the host's (nor a sibling's).
        let placed = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        for line in placed.lines() {
            let controllers = line.split(':').nth(1).unwrap_or_default();
            if controllers.is_empty() || controllers == "name=systemd" {
                assert!(
                    line.contains(&leaf),
                    "systemd is not in its own cgroup: {placed}"
                );
            }
        }
        let systemd = Systemd {
            pid,
            dir,
            _namespace: namespace,
        };
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

    /// `systemctl ARGS`, which must succeed: a failure panics with systemctl's words and the
    /// journal of `baton.service` (and of systemd itself).
    pub fn systemctl_ok(&self, args: &[&str]) -> Output {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.journal("baton")
        );
        out
    }

    /// `systemctl show -p NAME --value UNIT`.
    pub fn show(&self, unit: &str, property: &str) -> String {
        let out = self.systemctl(&["show", "-p", property, "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits up to `timeout` for `unit` to be active (again).
    pub fn wait_active(&self, unit: &str, timeout: Duration) {
        crate::eventually(timeout, &format!("{unit} to be active"), || {
            (self.show(unit, "ActiveState") == "active").then_some(())
        });
    }

    /// The unit's journal entries (`journalctl -o json`) that have every `FIELD=value` of
    /// `matches`.
    pub fn journal_entries(&self, unit: &str, matches: &[&str]) -> Vec<serde_json::Value> {
        let out = self
            .command("journalctl")
            .args(["-u", unit, "-o", "json", "--no-pager"])
            .args(matches)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
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
        // Then `self.namespace` is dropped: unshare is reaped and the cgroups removed.
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

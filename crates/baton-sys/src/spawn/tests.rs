use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sys::signal::Signal;

use super::clone::Method;
use super::slots::Slots;
use super::{ChildSetup, Spawn, SpawnError, Stage, Started};

/// Every way this machine can take (the shared one only on x86-64), with the sources in
/// slots (a child that shares the master's descriptors at first) and without.
fn methods() -> Vec<(Method, bool)> {
    let mut all = vec![
        (Method::Copied, true),
        (Method::Copied, false),
        (Method::Legacy, false),
    ];
    if cfg!(target_arch = "x86_64") {
        all.insert(0, (Method::Shared, true));
        all.insert(1, (Method::Shared, false));
    }
    all
}

/// Starts `spawn` `method`'s way (its sources in slots of its own, or not) with its stdout
/// on a pipe; returns its pid, everything it wrote and its exit code.
fn run(
    way: (Method, bool),
    mut spawn: Spawn,
    cgroup: Option<BorrowedFd<'_>>,
) -> (u32, String, i32) {
    let (method, slotted) = way;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    spawn.fd(write, 1);
    let mut slots = slotted.then(|| Slots::reserve().unwrap());
    let started = spawn.spawn_placed(method, cgroup, slots.as_mut()).unwrap();
    let pid = started.pid;
    // Its /proc entry stays until it is reaped.
    let from_proc = crate::pidfd::start_time(pid).unwrap();
    assert!(
        started.start_time.is_none_or(|t| t == from_proc),
        "{way:?}: {started:?}, /proc says {from_proc}"
    );
    if let Some(slots) = &slots {
        for slot in &slots.numbers {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", slot.as_raw_fd()));
            assert_eq!(link.unwrap(), Path::new("/dev/null"), "{way:?}: taken back");
        }
    }
    let mut out = String::new();
    std::fs::File::from(read).read_to_string(&mut out).unwrap();
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    let code = match status.unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, code) => code,
        other => panic!("{method:?}: {other:?}"),
    };
    (pid, out, code)
}

fn shell(script: &str) -> Spawn {
    let mut spawn = Spawn::new(Path::new("/bin/sh")).unwrap();
    spawn.arg("-c").unwrap().arg(script).unwrap();
    spawn.env("PATH", "/usr/bin:/bin").unwrap();
    spawn
}

#[test]
fn the_child_gets_its_arguments_exactly_its_environment_and_its_own_pid() {
    for method in methods() {
        let mut spawn = shell("echo $LISTEN_PID $$ $GREETING ${HOME:-no-home} \"$0\"");
        spawn.arg("zero with spaces").unwrap();
        spawn.env("GREETING", "hi").unwrap();
        spawn.env_own_pid("LISTEN_PID").unwrap();
        let (pid, out, code) = run(method, spawn, None);
        assert_eq!(code, 0, "{method:?}");
        assert_eq!(
            out.trim(),
            format!("{pid} {pid} hi no-home zero with spaces"),
            "{method:?}"
        );
    }
}

#[test]
fn placed_descriptors_are_inherited_at_their_numbers_and_nothing_else_leaks() {
    for method in methods() {
        let (a, _b) = crate::channel::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut spawn = shell("ls /proc/self/fd; readlink /proc/self/fd/4");
        // Targets 4 and 3 in swapped order: placing one cannot clobber a source.
        spawn.fd(OwnedFd::from(listener), 4).fd(a, 3);
        let (_, out, code) = run(method, spawn, None);
        assert_eq!(code, 0, "{method:?}");
        let lines: Vec<&str> = out.lines().collect();
        let (link, numbers) = lines.split_last().unwrap();
        let mut fds: Vec<i32> = numbers.iter().map(|s| s.parse().unwrap()).collect();
        fds.sort();
        // 0-2, the two placed, and the one `ls` opens to read the directory.
        assert_eq!(&fds[..5], &[0, 1, 2, 3, 4], "{method:?}: {out}");
        assert_eq!(fds.len(), 6, "{method:?}: inherited {fds:?}");
        assert!(link.starts_with("socket:"), "{method:?}: fd 4 is {link}");
    }
}

#[test]
fn the_child_starts_with_no_signal_blocked_and_sigpipe_default() {
    let ignored = |status: &str| {
        let line = status.lines().find(|l| l.starts_with("SigIgn:")).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let parent = ignored(&std::fs::read_to_string("/proc/self/status").unwrap());
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    assert_ne!(parent & sigpipe, 0, "Rust ignores SIGPIPE in this process");
    std::thread::spawn(move || {
        // This thread blocks some signals, as the master's threads do.
        crate::upgrade::block_signals(&[Signal::SIGTERM, Signal::SIGUSR2]).unwrap();
        for method in methods() {
            // cat itself, not a shell (which may reset the mask).
            let mut cat = Spawn::new(Path::new("/bin/cat")).unwrap();
            cat.arg("/proc/self/status").unwrap();
            let (_, out, code) = run(method, cat, None);
            assert_eq!(code, 0, "{method:?}");
            let blocked = out.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
            assert_eq!(blocked, "SigBlk:\t0000000000000000", "{method:?}");
            // Whatever this process inherited ignored stays so (a shell's `&` ignores
            // SIGINT), except SIGPIPE.
            assert_eq!(ignored(&out), parent & !sigpipe, "{method:?}");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn a_failure_names_its_stage_and_leaves_no_child() {
    for method in methods() {
        let spawn = Spawn::new(Path::new("/nonexistent/program")).unwrap();
        let mut slots = method.1.then(|| Slots::reserve().unwrap());
        match spawn.spawn_placed(method.0, None, slots.as_mut()) {
            Err(SpawnError::Failed { stage, source }) => {
                assert_eq!(stage, Stage::Execute, "{method:?}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT), "{method:?}");
            }
            other => panic!("{method:?}: {other:?}"),
        }
        let mut spawn = shell("true");
        spawn.cwd(Path::new("/nonexistent/dir")).unwrap();
        let err = spawn.spawn_placed(method.0, None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "changing to its directory: No such file or directory (os error 2)",
            "{method:?}"
        );
    }
    assert!(matches!(
        Spawn::new(Path::new("/bin/sh")).unwrap().arg("a\0b"),
        Err(SpawnError::Nul("an argument"))
    ));
}

#[test]
fn directory_process_group_and_limits_are_set() {
    for method in methods() {
        let mut spawn = shell("pwd; ps -o pgid= -p $$; ulimit -n; ulimit -c; umask");
        spawn
            .cwd(Path::new("/tmp"))
            .unwrap()
            .new_process_group()
            .setup(ChildSetup {
                umask: Some(0o027),
                max_open_files: Some(777),
                max_core_size: Some(0),
                ..ChildSetup::default()
            });
        let (pid, out, code) = run(method, spawn, None);
        assert_eq!(code, 0, "{method:?}: {out}");
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(
            words,
            ["/tmp", &pid.to_string(), "777", "0", "0027"],
            "{method:?}"
        );
    }
}

#[test]
fn a_user_change_touches_the_child_alone() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "a user change needs root, as the test suite runs"
    );
    for method in methods() {
        let mut spawn = shell("id -u; id -g; id -G");
        spawn.setup(ChildSetup {
            uid: Some(65534),
            gid: Some(65534),
            ..ChildSetup::default()
        });
        let (_, out, code) = run(method, spawn, None);
        assert_eq!(code, 0, "{method:?}");
        assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["65534"; 3]);
        // glibc's setuid would have changed every thread of this process too.
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let status = std::fs::read_to_string(task.unwrap().path().join("status"));
            let Ok(status) = status else { continue }; // a thread that just ended
            let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert_eq!(
                uid.split_whitespace().nth(2),
                Some("0"),
                "{method:?}: {uid}"
            );
        }
    }
}

#[test]
fn the_child_is_made_in_the_given_cgroup() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount = mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.starts_with("cgroup2 ")).then(|| mount.split_whitespace().nth(4).unwrap())
    });
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own.lines().find_map(|l| l.strip_prefix("0::"));
    // The test suite runs as root where cgroup2 is mounted (alone or as `unified`).
    let (Some(mount), Some(own)) = (mount, own) else {
        panic!("no cgroup2 mount or no cgroup v2 entry for this process");
    };
    for method in methods() {
        let name = format!("baton-sys-spawn-{}-{method:?}", std::process::id());
        let dir = Path::new(mount)
            .join(own.trim_start_matches('/'))
            .join(&name);
        std::fs::create_dir(&dir).unwrap();
        let group = std::fs::File::open(&dir).unwrap();
        let (_, out, code) = run(
            method,
            shell("cat /proc/self/cgroup"),
            Some(std::os::fd::AsFd::as_fd(&group)),
        );
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(code, 0, "{method:?}");
        let line = out.lines().find(|l| l.starts_with("0::")).unwrap();
        assert!(line.ends_with(&format!("/{name}")), "{method:?}: {line}");
    }
}

#[test]
fn threads_spawning_at_once_each_get_their_own_children() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    let method = methods()[i % methods().len()];
                    let (_, out, code) = run(method, shell(&format!("echo {t}.{i}")), None);
                    assert_eq!((out.trim(), code), (format!("{t}.{i}").as_str(), 0));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn the_start_time_is_known_without_proc_nearly_always() {
    let mut known = 0;
    for _ in 0..20 {
        let started: Started = Spawn::new(Path::new("/bin/true"))
            .unwrap()
            .spawn(None)
            .unwrap();
        let from_proc = crate::pidfd::start_time(started.pid).unwrap();
        if let Some(ticks) = started.start_time {
            assert_eq!(ticks, from_proc, "{started:?}");
            known += 1;
        }
        let pid = nix::unistd::Pid::from_raw(started.pid as i32);
        nix::sys::wait::waitpid(pid, None).unwrap();
    }
    // Unknown only when the clock crossed a 10 ms tick during the clone.
    assert!(known >= 10, "known {known} times of 20");
}

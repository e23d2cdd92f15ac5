//! Reading a configuration file whole: every problem found at once, not only the first, each
//! naming its key and the line where it can be found. The checks that need the whole file run
//! after parsing: names used twice, addresses this machine has, the supervisor's settings; a
//! program's own checks are in `program.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_proto::ListenerAddress;

use super::listener::RawListener;
use super::locate::{find_line, find_nth_line, locate_value, qualify};
use super::raw::{RawConfig, RawSupervisor};
use super::{
    Config, ConfigError, ControlConfig, DEFAULT_CONTROL_SOCKET, DEFAULT_RUNTIME_DIR,
    ListenerConfig, SupervisorConfig,
};

/// Reads `text` (the file at `path`) into a [`Config`], with every problem found.
pub(super) fn parse_all(path: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    let (raw, mut problems) = read_all(path, text);
    let raw = match raw {
        Some(raw) => raw,
        None => return Err(problems),
    };
    let mut check = Check {
        path,
        text,
        base: Base::of(path),
        problems: Vec::new(),
    };
    let listeners = check.listeners(raw.listeners);
    let programs = match check.programs(raw.worker, raw.workers, &listeners) {
        Ok(programs) => programs,
        Err(more) => {
            // A program set aside for a problem already reported leaves `workers` empty:
            // "missing" then is no second problem of the file, only a consequence.
            if problems.is_empty() {
                problems.extend(more);
            }
            return Err(problems);
        }
    };
    check.addresses(&listeners);
    check.metrics_listen(&raw.supervisor, &listeners);
    problems.append(&mut check.problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Config {
        source: path.to_owned(),
        listeners,
        programs,
        supervisor: supervisor(raw.supervisor, &check.base),
    })
}

/// Problems a file may have before it is read whole: past that many, `check` stops listing.
const MAX_READ_PROBLEMS: usize = 100;

/// Reads the YAML into its raw shape, with every problem of a value or a key: after each one the
/// offending key (its line and those indented below it) is set aside as a comment and the text
/// is read again, so the next problem is found at its own line and column. The raw shape is
/// returned when what is left reads; a key set aside takes its default there, which the checks
/// of the whole file may then report as missing. A syntax error ends the reading.
fn read_all(path: &Path, text: &str) -> (Option<RawConfig>, Vec<ConfigError>) {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut problems: Vec<ConfigError> = Vec::new();
    let mut set_aside: Vec<String> = Vec::new();
    loop {
        let current = lines.join("\n") + "\n";
        let problem = match read(path, &current) {
            Ok(raw) => return (Some(raw), problems),
            Err(problem) => problem,
        };
        // A required key set aside is missing now: that is no problem of the file.
        let consequence = set_aside
            .iter()
            .any(|key| problem.message.contains(&format!("missing field `{key}`")));
        if consequence {
            return (None, problems);
        }
        let line = problem.line;
        let syntax = problem.message.contains("did not find expected")
            || problem.message.contains("found character")
            || problem.message.contains("while parsing")
            || problem.message.contains("while scanning");
        problems.push(problem);
        let Some(at) = line.filter(|_| !syntax && problems.len() < MAX_READ_PROBLEMS) else {
            return (None, problems);
        };
        match set_aside_key(&mut lines, at) {
            Some(key) => set_aside.push(key),
            None => return (None, problems),
        }
    }
}

/// Comments out the key at 1-based `line` and every line indented below it; returns the key.
/// `None` when there is no key there to set aside (the reading cannot go on).
fn set_aside_key(lines: &mut [String], line: usize) -> Option<String> {
    let first = lines.get(line.checked_sub(1)?)?;
    let code = first.trim_start();
    if code.is_empty() || code.starts_with('#') {
        return None;
    }
    let indent = first.len() - code.len();
    let key = code
        .trim_start_matches("- ")
        .split(':')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if code.starts_with("- ") && !code.contains(':') {
        return None; // a list item with no key of its own
    }
    let end = lines[line..]
        .iter()
        .position(|l| {
            let c = l.trim_start();
            !c.is_empty() && !c.starts_with('#') && l.len() - c.len() <= indent
        })
        .map_or(lines.len(), |n| line + n);
    for l in &mut lines[line - 1..end] {
        *l = format!("# {l}");
    }
    Some(key)
}

/// The YAML read into its raw shape; the first problem, placed at the value it is about where
/// that can be found.
fn read(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    serde_yaml::from_str(text).map_err(|err| {
        let location = err.location();
        let mut message = err.to_string();
        // The parser appends " at line L column C"; we print the location first instead.
        if let Some(cut) = message.rfind(" at line ") {
            message.truncate(cut);
        }
        let mut line = location.as_ref().map(|l| l.line());
        let mut column = location.as_ref().map(|l| l.column());
        if let Some((l, c, key)) = line.and_then(|from| locate_value(text, from, &message)) {
            (line, column) = (Some(l), Some(c));
            message = qualify(&message, &key);
        } else if let Some((l, c)) = duplicate_key(text, &message) {
            // The parser places a key given twice at the start of the mapping: show the second.
            (line, column) = (Some(l), Some(c));
        }
        ConfigError {
            path: path.to_owned(),
            line,
            column,
            message: super::locate::plain(&message),
        }
    })
}

/// For a "duplicate field `K`" message: the line and column of the second top-level or nested
/// `K:` at the indentation of its first occurrence.
fn duplicate_key(text: &str, message: &str) -> Option<(usize, usize)> {
    let key = message
        .strip_prefix("duplicate field `")?
        .split('`')
        .next()?;
    let mut seen: Vec<usize> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        let indent = line.len() - code.len();
        if code.starts_with(&format!("{key}:")) {
            if seen.contains(&indent) {
                return Some((i + 1, indent + 1));
            }
            seen.push(indent);
        }
    }
    None
}

/// The control socket a configuration names, read from `text` leniently: whatever else is wrong
/// with the file, the running master can still be found (`baton status -c FILE` with a file
/// being edited). A file that is not YAML any more (a half-written edit) is read line by line
/// for its one `socket:` key (the schema has no other). `None`: no socket can be told.
pub(super) fn control_socket(path: &Path, text: &str) -> Option<PathBuf> {
    // The `supervisor:` block alone when it can be told (a file of 10 000 listeners takes
    // 60 ms to parse whole, which `baton status -c` paid each time), else the whole file.
    let alone = supervisor_block(text).and_then(|b| serde_yaml::from_str(b).ok());
    let socket = match alone.map_or_else(|| serde_yaml::from_str::<serde_yaml::Value>(text), Ok) {
        Ok(value) => value
            .get("supervisor")
            .and_then(|s| s.get("control"))
            .and_then(|c| c.get("socket"))
            .and_then(|s| s.as_str())
            .map(str::to_string),
        Err(_) => Some(socket_line(text)?),
    };
    Some(match socket {
        Some(socket) => Base::of(path).join(Path::new(&socket)),
        None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
    })
}

/// The top-level `supervisor:` block of a block-style file (its line, at column 0, and the
/// lines after it up to the next one that starts at column 0 with anything but a comment), when
/// there is exactly one such line: a text that parses alone as the document's `supervisor` key
/// (a file whose block refers to an anchor elsewhere does not parse alone, and is read whole).
pub(super) fn supervisor_block(text: &str) -> Option<&str> {
    let top_level = |line: &str| !line.is_empty() && !line.starts_with([' ', '\t', '#', '\r']);
    let mut at = 0;
    let mut found = None;
    for line in text.split_inclusive('\n') {
        let key = line.strip_prefix("supervisor:");
        if key.is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n'])) {
            if found.is_some() {
                return None;
            }
            found = Some(at);
        }
        at += line.len();
    }
    let start = found?;
    let rest = &text[start..];
    let mut end = rest.len();
    let mut offset = 0;
    for (i, line) in rest.split_inclusive('\n').enumerate() {
        if i > 0 && top_level(line.trim_end_matches('\n')) {
            end = offset;
            break;
        }
        offset += line.len();
    }
    Some(&rest[..end])
}

/// The value of the one `socket:` key in a text that does not parse as YAML (`socket: PATH` on
/// a line of its own or inside `{...}`, quoted or not, a comment after it); `None` unless there
/// is exactly one.
fn socket_line(text: &str) -> Option<String> {
    let mut found = text.lines().filter_map(|line| {
        let line = line.split(" #").next().unwrap_or(line);
        let at = line.find("socket:")?;
        let before = line[..at].chars().last();
        if before.is_some_and(|c| !(c.is_whitespace() || c == '{' || c == ',')) {
            return None;
        }
        let value = line[at + "socket:".len()..].trim_start();
        let value = match value.chars().next()? {
            q @ ('"' | '\'') => value[1..].split(q).next()?,
            _ => value.split([',', '}']).next()?.trim_end(),
        };
        (!value.is_empty()).then(|| value.to_string())
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The directory relative paths in a file are relative to: the file's own, made absolute and
/// free of symbolic links when it exists, so that `../run/baton.sock` is shown as the place it
/// names (`/srv/run/baton.sock`), not as `conf/../run/baton.sock`.
#[derive(Debug)]
pub(super) struct Base {
    dir: PathBuf,
    /// Whether `dir` is canonical (it exists): then a leading `..` can be resolved exactly.
    canonical: bool,
}

impl Base {
    fn of(file: &Path) -> Base {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        match std::fs::canonicalize(dir) {
            Ok(dir) => Base {
                dir,
                canonical: true,
            },
            Err(_) => Base {
                dir: dir.to_owned(),
                canonical: false,
            },
        }
    }

    /// `path` relative to this directory. A leading `..` takes the last component off the
    /// directory, which is exact when the directory is canonical (no link to step back over);
    /// a `..` after a component of `path` itself stays, since that component may be a link.
    pub(super) fn join(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_owned();
        }
        let mut out = self.dir.clone();
        let mut components = path.components().peekable();
        while self.canonical && components.peek() == Some(&std::path::Component::ParentDir) {
            components.next();
            out.pop(); // `/..` is `/`
        }
        while components.peek() == Some(&std::path::Component::CurDir) {
            components.next();
        }
        out.extend(components);
        out
    }
}

/// The checks of one file: where it is, its text (to find lines in), and the problems so far.
pub(super) struct Check<'a> {
    path: &'a Path,
    text: &'a str,
    /// Relative paths in the file are relative to its directory.
    pub(super) base: Base,
    problems: Vec<ConfigError>,
}

impl Check<'_> {
    /// Records a problem, at the first line holding `needle` if given and found.
    pub(super) fn problem(&mut self, needle: Option<&str>, message: impl Into<String>) {
        let line = needle.and_then(|n| find_line(self.text, n));
        self.problems
            .push(ConfigError::at(self.path, line, message));
    }

    /// The problems so far, ending the checks.
    pub(super) fn stop(&mut self) -> Vec<ConfigError> {
        std::mem::take(&mut self.problems)
    }

    /// `listeners:`: names and addresses used once each; relative Unix paths resolved.
    fn listeners(&mut self, raw: Vec<RawListener>) -> Vec<ListenerConfig> {
        let mut names = BTreeMap::new();
        let mut addresses = HashMap::new();
        for (i, l) in raw.iter().enumerate() {
            if let Some(first) = names.insert(l.name.clone(), i) {
                // At this occurrence of the name, not at the first.
                let earlier = raw[..i].iter().filter(|o| o.name == l.name).count();
                let line = find_nth_line(self.text, &format!("name: {}", l.name), earlier);
                self.problems.push(ConfigError::at(
                    self.path,
                    line,
                    format!(
                        "listeners[{i}]: name `{}` is already used by listeners[{first}]",
                        l.name
                    ),
                ));
            }
            // A Unix path is one file whatever the socket's type; TCP and UDP ports are apart.
            let key = match &l.address {
                ListenerAddress::UnixDatagram { path } => {
                    ListenerAddress::Unix { path: path.clone() }
                }
                other => other.clone(),
            };
            if let Some(first) = addresses.insert(key, i) {
                self.problem(
                    None,
                    format!(
                        "listeners[{i}] (`{}`): {} is already used by listeners[{first}]",
                        l.name, l.address
                    ),
                );
            }
        }
        raw.into_iter()
            .map(|l| ListenerConfig {
                address: match l.address {
                    // `@name`: an abstract socket, no file.
                    ListenerAddress::Unix { path: p }
                        if p.is_relative()
                            && !p.as_os_str().as_encoded_bytes().starts_with(b"@") =>
                    {
                        ListenerAddress::Unix {
                            path: self.base.join(&p),
                        }
                    }
                    ListenerAddress::UnixDatagram { path: p }
                        if p.is_relative()
                            && !p.as_os_str().as_encoded_bytes().starts_with(b"@") =>
                    {
                        ListenerAddress::UnixDatagram {
                            path: self.base.join(&p),
                        }
                    }
                    other => other,
                },
                name: l.name,
                backlog: l.backlog,
                mode: l.mode.map(|m| m.0),
                options: l.options,
            })
            .collect()
    }

    /// Every listener's address can be bound on this machine.
    fn addresses(&mut self, listeners: &[ListenerConfig]) {
        // What is asked of the machine depends on the IP address or the directory only: each
        // asked once (a file of 10 000 listeners asked 10 000 times).
        #[derive(PartialEq, Eq, Hash)]
        enum Asked<'a> {
            Ip(std::net::IpAddr),
            Directory(Option<&'a Path>),
        }
        let mut asked: HashMap<Asked, Option<String>> = HashMap::new();
        for (i, l) in listeners.iter().enumerate() {
            let key = match &l.address {
                ListenerAddress::Tcp { address } | ListenerAddress::Udp { address } => {
                    Asked::Ip(address.ip())
                }
                ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path } => {
                    Asked::Directory(path.parent())
                }
            };
            let problem = asked
                .entry(key)
                .or_insert_with(|| address_problem(&l.address));
            if let Some(problem) = problem.clone() {
                self.problem(
                    None,
                    format!("listeners[{i}] (`{}`): {} {problem}", l.name, l.address),
                );
            }
        }
    }

    /// `supervisor.metrics_listen`: an address of this machine that no listener uses.
    fn metrics_listen(&mut self, supervisor: &RawSupervisor, listeners: &[ListenerConfig]) {
        let Some(metrics) = supervisor.metrics_listen.as_ref().map(|a| a.0) else {
            return;
        };
        let at = Some("metrics_listen:");
        let tcp = ListenerAddress::Tcp { address: metrics };
        if let Some(problem) = address_problem(&tcp) {
            self.problem(
                at,
                format!("supervisor.metrics_listen: {metrics} {problem}"),
            );
        }
        // The same port on the same address, or on a wildcard one, would not bind.
        let clash = listeners.iter().find(|l| match l.address {
            ListenerAddress::Tcp { address } => {
                address.port() == metrics.port()
                    && (address.ip() == metrics.ip()
                        || address.ip().is_unspecified()
                        || metrics.ip().is_unspecified())
            }
            ListenerAddress::Unix { .. }
            | ListenerAddress::Udp { .. }
            | ListenerAddress::UnixDatagram { .. } => false,
        });
        if let Some(l) = clash {
            self.problem(
                at,
                format!(
                    "supervisor.metrics_listen: {metrics} clashes with listener `{}` ({})",
                    l.name, l.address
                ),
            );
        }
    }
}

/// `supervisor:` with its defaults.
fn supervisor(s: RawSupervisor, base: &Base) -> SupervisorConfig {
    SupervisorConfig {
        max_draining: s.max_draining.0,
        forward_usr1: s.forward_usr1,
        control: ControlConfig {
            socket: s
                .control
                .socket
                .map_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET), |p| base.join(&p)),
            mode: s.control.mode.map_or(0o600, |m| m.0),
            read_group: s.control.read_group.map(|g| g.0),
            allow_uids: s.control.allow_users.iter().map(|u| u.0).collect(),
            allow_gids: s.control.allow_groups.iter().map(|g| g.0).collect(),
            timeout: s.control.timeout.map_or(Duration::from_secs(5), |t| t.0),
            max_clients: s.control.max_clients.map_or(16, |m| m.0),
            max_followers: s.control.max_followers.map_or(8, |m| m.0),
        },
        canary_window: s.canary_window.map(|t| t.0),
        upgrade_signal: s.upgrade_signal.and_then(|u| u.0),
        upgrade_timeout: s
            .upgrade_timeout
            .map_or(crate::DEFAULT_UPGRADE_TIMEOUT, |t| t.0),
        metrics_listen: s.metrics_listen.map(|a| a.0),
        log_file: s.log_file.map(|f| base.join(&f)),
        pid_file: s.pid_file.map(|f| base.join(&f)),
        cgroups: s.cgroups,
        queue_watch: s.queue_watch.map(|t| t.0),
        stop_delay: s.stop_delay.map_or(Duration::ZERO, |d| d.0),
        watch_config: s.watch.contains(&super::raw::WatchTarget::Config),
        runtime_dir: s
            .runtime_dir
            .map_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR), |d| base.join(&d)),
    }
}

/// Whether a listener's address can be bound here, judged without binding it: the IP must be
/// one of this machine's (bind it with port 0), a Unix socket's directory must exist.
fn address_problem(address: &ListenerAddress) -> Option<String> {
    match address {
        ListenerAddress::Tcp { address } | ListenerAddress::Udp { address } => {
            let probe = std::net::SocketAddr::new(address.ip(), 0);
            match std::net::TcpListener::bind(probe) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EADDRNOTAVAIL) => {
                    Some("is not an address of this machine".into())
                }
                _ => None,
            }
        }
        ListenerAddress::Unix { path } | ListenerAddress::UnixDatagram { path } => {
            match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Some(format!(
                    "cannot be created: {} is not a directory",
                    dir.display()
                )),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_shown_as_the_places_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("conf");
        std::fs::create_dir(&conf).unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        let base = Base::of(&conf.join("baton.yaml"));
        assert_eq!(
            base.join(Path::new("../run/b.sock")),
            real.join("run/b.sock")
        );
        assert_eq!(base.join(Path::new("./x.sock")), real.join("conf/x.sock"));
        assert_eq!(
            base.join(Path::new("/abs/x.sock")),
            Path::new("/abs/x.sock")
        );
        // A `..` after a component of the path itself is left to the kernel (a link, maybe).
        assert_eq!(base.join(Path::new("a/../b")), real.join("conf/a/../b"));
        // A directory that does not exist is not canonical: nothing is resolved.
        let gone = Base::of(Path::new("/nonexistent-baton-dir/baton.yaml"));
        assert_eq!(
            gone.join(Path::new("../x.sock")),
            Path::new("/nonexistent-baton-dir/../x.sock")
        );
    }
}

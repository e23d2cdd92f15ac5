//! A worker's memory, from `/proc`: the worker's process and every descendant (a server's own
//! children count toward its worker), as resident set (RSS: pages in memory, a page shared by
//! two processes counted in both) and proportional set (PSS: a shared page divided among its
//! sharers, so the totals of forked workers add up to what they really use).

use std::collections::HashSet;

/// Most processes walked under one worker: a fork bomb costs the master a bounded read.
const MAX_PROCESSES: usize = 4096;

/// The memory of a process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    pub(crate) rss_kib: u64,
    pub(crate) pss_kib: u64,
    /// Processes counted (the worker and its descendants).
    pub(crate) processes: u32,
}

impl std::ops::Add for Memory {
    type Output = Memory;
    fn add(self, other: Memory) -> Memory {
        Memory {
            rss_kib: self.rss_kib + other.rss_kib,
            pss_kib: self.pss_kib + other.pss_kib,
            processes: self.processes + other.processes,
        }
    }
}

/// `pid` and its descendants, from `/proc/<pid>/task/*/children`.
pub(crate) fn tree(pid: u32) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut todo = vec![pid];
    let mut out = Vec::new();
    while let Some(p) = todo.pop() {
        if out.len() >= MAX_PROCESSES || !seen.insert(p) {
            continue;
        }
        out.push(p);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// RSS and PSS of `pid` and its descendants (`smaps_rollup`); `None` if `pid` is gone.
pub(crate) fn of_tree(pid: u32) -> Option<Memory> {
    let mut total = Memory::default();
    for (i, p) in tree(pid).into_iter().enumerate() {
        match rollup(p) {
            Some(m) => total = total + m,
            // The worker itself must be readable; a child that just exited is not counted.
            None if i == 0 => return None,
            None => {}
        }
    }
    Some(total)
}

/// RSS of `pid` and its descendants from `statm` (cheaper than `smaps_rollup`: no page walk),
/// for the periodic `recycle:` check; `None` if `pid` is gone.
pub(crate) fn rss_of_tree(pid: u32) -> Option<u64> {
    // statm counts pages.
    let page_kib = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4, |bytes| bytes as u64 / 1024);
    let mut total = 0;
    for (i, p) in tree(pid).into_iter().enumerate() {
        let pages = std::fs::read_to_string(format!("/proc/{p}/statm"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok());
        match pages {
            Some(pages) => total += pages * page_kib,
            None if i == 0 => return None,
            None => {}
        }
    }
    Some(total)
}

fn rollup(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
    };
    Some(Memory {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:").unwrap_or(0),
        processes: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_counts_toward_its_parent() {
        let me = std::process::id();
        let alone = of_tree(me).unwrap();
        assert!(alone.rss_kib > 0 && alone.pss_kib > 0 && alone.pss_kib <= alone.rss_kib);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let with_child = of_tree(me).unwrap();
        assert!(tree(me).contains(&child.id()));
        assert!(with_child.processes >= 2, "{with_child:?} {alone:?}");
        assert!(rss_of_tree(me).unwrap() > 0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(of_tree(u32::MAX), None);
    }
}

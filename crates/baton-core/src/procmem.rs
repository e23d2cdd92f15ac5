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

/// RSS and PSS of `processes` (a worker and its descendants, from [`tree`]) summed, from their
/// `smaps_rollup`; `None` if the first (the worker) is gone.
fn rollup_of(processes: &[u32]) -> Option<Memory> {
    let mut total = Memory::default();
    for (i, p) in processes.iter().enumerate() {
        match rollup(*p) {
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
    statm_rss_of(&tree(pid))
}

/// The summed resident set of `processes` from `statm` (kept by the kernel as counters), in
/// KiB; `None` if the first is gone.
fn statm_rss_of(processes: &[u32]) -> Option<u64> {
    // statm counts pages.
    let page_kib = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4, |bytes| bytes as u64 / 1024);
    let mut total = 0;
    for (i, p) in processes.iter().enumerate() {
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

/// How far a tree's resident set may move, as a fraction of it, before its memory is read
/// again (see [`MemoryCensus`]).
const REREAD_AFTER: u64 = 100; // 1 %

/// The memory of workers' process trees, kept between `baton status` calls. `smaps_rollup`
/// walks a process's page tables (its cost grows with the memory mapped: about 2 ms for a
/// worker of 100 MiB here), and PSS is only found that way; `statm`'s counters are read
/// without a walk. A tree whose processes are the same and whose resident set (from `statm`)
/// moved by no more than 1 % since it was walked shows the figures of that walk, which are
/// then within about 1 % too (PSS moves with RSS but for pages another process maps or
/// unmaps).
#[derive(Debug, Default)]
pub(crate) struct MemoryCensus {
    trees: std::collections::HashMap<u32, Walked>,
}

/// A tree as last walked.
#[derive(Debug)]
struct Walked {
    processes: Vec<u32>,
    statm_kib: u64,
    memory: Memory,
}

impl MemoryCensus {
    /// The memory of each of `pids`' trees; a pid that is gone is left out.
    pub(crate) fn of_trees(&mut self, pids: &[u32]) -> std::collections::HashMap<u32, Memory> {
        let mut before = std::mem::take(&mut self.trees);
        let mut out = std::collections::HashMap::new();
        for &pid in pids {
            let processes = tree(pid);
            let Some(statm_kib) = statm_rss_of(&processes) else {
                continue;
            };
            if let Some(walked) = before.remove(&pid)
                && walked.processes == processes
                && statm_kib.abs_diff(walked.statm_kib) <= walked.statm_kib / REREAD_AFTER
            {
                out.insert(pid, walked.memory);
                self.trees.insert(pid, walked);
                continue;
            }
            let Some(memory) = rollup_of(&processes) else {
                continue;
            };
            self.trees.insert(
                pid,
                Walked {
                    processes,
                    statm_kib,
                    memory,
                },
            );
            out.insert(pid, memory);
        }
        out
    }
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
        let alone = rollup_of(&tree(me)).unwrap();
        assert!(alone.rss_kib > 0 && alone.pss_kib > 0 && alone.pss_kib <= alone.rss_kib);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let with_child = rollup_of(&tree(me)).unwrap();
        assert!(tree(me).contains(&child.id()));
        assert!(with_child.processes >= 2, "{with_child:?} {alone:?}");
        assert!(rss_of_tree(me).unwrap() > 0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(rollup_of(&tree(u32::MAX)), None);
    }

    /// The census walks a tree again when its resident set moved by more than 1 %, and not
    /// when it did not; a process gone is left out and forgotten. (On a `sleep`, whose memory
    /// does not move.)
    #[test]
    fn the_memory_census_reads_again_when_the_resident_set_moves() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = sleeper.id();
        // Until it sleeps, exec done: its memory moves no more.
        let asleep = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim() == "sleep"
                && stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .starts_with('S')
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !asleep() {
            assert!(std::time::Instant::now() < deadline, "sleep never slept");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut census = MemoryCensus::default();
        let first = census.of_trees(&[pid])[&pid];
        assert!(first.rss_kib > 0 && first.processes == 1, "{first:?}");
        // Unchanged since: the walk's figures, not walked again.
        census.trees.get_mut(&pid).unwrap().memory.pss_kib = 1;
        assert_eq!(census.of_trees(&[pid])[&pid].pss_kib, 1, "kept");
        // As if walked when the tree was 2 % larger: walked again now.
        let walked = census.trees.get_mut(&pid).unwrap();
        walked.statm_kib += walked.statm_kib / 50 + 1;
        let again = census.of_trees(&[pid])[&pid];
        assert!(
            again.pss_kib != 1 && again.rss_kib == first.rss_kib,
            "walked again"
        );
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert!(census.of_trees(&[pid]).is_empty());
        assert!(census.trees.is_empty(), "forgotten");
    }
}

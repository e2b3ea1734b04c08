//! Reading a process's CPU time and memory from `/proc` (Linux): for the
//! generator's own CPU use, and for the proxies a comparison measures.

use std::path::Path;

/// Clock ticks per second in `/proc/<pid>/stat`: the kernel's `USER_HZ`,
/// which is 100 on every Linux architecture infermesh runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time and memory of a process (with its descendants, for servers
/// like nginx that fork workers).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Of which system CPU time (the kernel working for the process:
    /// sockets, wake-ups), in seconds.
    pub system_seconds: f64,
    /// Resident memory now, in bytes.
    pub rss_bytes: u64,
    /// The highest resident memory so far, in bytes.
    pub peak_rss_bytes: u64,
    /// Of the resident memory now, the anonymous part (`RssAnon`): what
    /// the process allocated for itself (heap, stacks, its data), in
    /// bytes. The rest is mapped files, mostly the program's own code,
    /// which the page cache holds once for every process of the same
    /// binary (every sidecar of a node).
    pub anon_bytes: u64,
}

/// Usages of several processes, added up.
impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.cpu_seconds += other.cpu_seconds;
        self.system_seconds += other.system_seconds;
        self.rss_bytes += other.rss_bytes;
        self.peak_rss_bytes += other.peak_rss_bytes;
        self.anon_bytes += other.anon_bytes;
    }
}

/// The CPUs this process may use (at least 1): the default width of the
/// proxies and of the generator, and what reports say was shared.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The usage of this process.
pub fn own() -> std::io::Result<Usage> {
    read(Path::new("/proc/self"))
}

/// The usage of `pid` and every process descended from it.
pub fn tree(pid: u32) -> std::io::Result<Usage> {
    let mut total = read(&Path::new("/proc").join(pid.to_string()))?;
    for child in descendants(pid) {
        if let Ok(u) = read(&Path::new("/proc").join(child.to_string())) {
            total += u;
        }
    }
    Ok(total)
}

fn read(dir: &Path) -> std::io::Result<Usage> {
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    // Fields after the command name, which may hold spaces and parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu_seconds = (ticks(11) + ticks(12)) / TICKS_PER_SECOND;
    let system_seconds = ticks(12) / TICKS_PER_SECOND;
    let status = std::fs::read_to_string(dir.join("status"))?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(Usage {
        cpu_seconds,
        system_seconds,
        rss_bytes: kib("VmRSS:"),
        peak_rss_bytes: kib("VmHWM:"),
        anon_bytes: kib("RssAnon:"),
    })
}

/// Whether `pid` is a running process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Every process whose parent chain leads to `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let start = own().unwrap();
        // Burn a little CPU so the clock moves.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let end = own().unwrap();
        assert!(end.cpu_seconds >= start.cpu_seconds);
        assert!(end.rss_bytes > 0 && end.peak_rss_bytes >= end.rss_bytes);
        // A heap is anonymous memory, and part of the resident memory.
        assert!(end.anon_bytes > 0 && end.anon_bytes <= end.rss_bytes);
    }

    #[test]
    fn counts_child_processes() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        assert!(descendants(me).contains(&child.id()));
        let with_child = tree(me).unwrap();
        assert!(with_child.rss_bytes > own().unwrap().rss_bytes);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

//! Medians, percentiles and machine-wide CPU time.

use anyhow::{Context as _, Result, anyhow};

/// The median of `v` (mean of the two middle values for an even count); NaN when empty.
/// NaN entries (not measured) are ignored.
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of an already sorted slice; NaN when empty.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// Aggregate CPU time of the machine, from the first line of `/proc/stat`, in clock ticks,
/// with the moment it was read. `/proc/stat` is not namespaced: it counts the client, the
/// balancer and the backends alike.
///
/// Busy time is taken as wall time × CPUs minus idle, iowait and steal: on a tickless kernel
/// the idle and iowait columns come from the precise idle-time accounting, while user,
/// system and softirq are sampled at the tick and miss short bursts of work between ticks on
/// a CPU that is otherwise idle (a light load of short connections reads as almost nothing).
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq, sampled at the tick (guest is inside user).
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Time the hypervisor gave to other guests.
    pub steal: u64,
    pub at: std::time::Instant,
    /// CPUs these times add up (all of them, or the one read).
    pub cpus: usize,
}

impl CpuTimes {
    /// The machine's times (`cpu` = `None`), or one CPU's.
    pub fn read(cpu: Option<usize>) -> Result<CpuTimes> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_proc_stat(&text, cpu)
    }

    /// Busy time between `self` (earlier) and `later`, in seconds of one CPU: CPUs × wall time
    /// − idle − iowait − steal.
    pub fn busy_secs_until(&self, later: &CpuTimes) -> f64 {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let idle = later.idle.saturating_sub(self.idle) as f64 / ticks_per_sec();
        (self.cpus as f64 * wall - idle - self.steal_secs_until(later)).max(0.0)
    }

    /// Busy time between `self` and `later` from the tick-sampled columns, in seconds of one CPU.
    pub fn sampled_busy_secs_until(&self, later: &CpuTimes) -> f64 {
        later.busy.saturating_sub(self.busy) as f64 / ticks_per_sec()
    }

    /// Stolen time between `self` and `later`, in seconds of one CPU.
    pub fn steal_secs_until(&self, later: &CpuTimes) -> f64 {
        later.steal.saturating_sub(self.steal) as f64 / ticks_per_sec()
    }
}

/// The machine's CPUs (at least 1).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Parses the aggregate `cpu` line of `/proc/stat` (`cpu` = `None`), or CPU `cpu`'s line.
pub fn parse_proc_stat(text: &str, cpu: Option<usize>) -> Result<CpuTimes> {
    let name = cpu.map_or("cpu".to_owned(), |n| format!("cpu{n}"));
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .ok_or_else(|| anyhow!("no {name} line in /proc/stat"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice
    Ok(CpuTimes {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        idle: at(3) + at(4),
        steal: at(7),
        at: std::time::Instant::now(),
        cpus: match cpu {
            Some(_) => 1,
            None => cpus(),
        },
    })
}

/// The packet count of the (first) `counter` in `nft list` output.
pub fn parse_nft_counter(text: &str) -> Result<u64> {
    text.split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no counter in {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
    }

    #[test]
    fn proc_stat_and_nft_counters() {
        let s = "cpu  10 1 5 100 2 3 4 7 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        let c = parse_proc_stat(s, None).unwrap();
        assert_eq!((c.busy, c.idle, c.steal), (23, 102, 7));
        let c0 = parse_proc_stat(s, Some(0)).unwrap();
        assert_eq!((c0.busy, c0.idle, c0.steal, c0.cpus), (5, 2, 1, 1));
        assert!(parse_proc_stat(s, Some(1)).is_err());
        let nft = "table netdev lbbench {\n\tchain blast {\n\t\ttype filter hook ingress device \"eth0\" priority filter; policy accept;\n\t\tudp dport 5353 counter packets 1234 bytes 130804 drop\n\t}\n}\n";
        assert_eq!(parse_nft_counter(nft).unwrap(), 1234);
        assert!(parse_nft_counter("table netdev lbbench {}").is_err());
    }
}

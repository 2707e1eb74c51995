//! Load figures from `/proc`: the parsers are pure (the tests feed them
//! text), the sampler reads the files and keeps the previous CPU counters,
//! since `/proc/stat` counts from boot and usage is a difference.

use kiln_db::nodes::NodeLoad;

/// The 1-minute load average: the first field of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// CPU time from the aggregate `cpu` line of `/proc/stat`, in ticks:
/// (busy, total). Idle is `idle` + `iowait`; `guest` and `guest_nice` are
/// already counted in `user` and `nice`, so they are left out of the total.
pub fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    let total: u64 = fields.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let idle = fields[3].saturating_add(fields.get(4).copied().unwrap_or(0));
    Some((total.saturating_sub(idle), total))
}

/// Share of CPU busy between two `/proc/stat` readings, 0 to 1; `None`
/// when no tick passed (or the counters went back, as after a restore).
pub fn cpu_between(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1).filter(|t| *t > 0)?;
    let busy = after.0.checked_sub(before.0)?;
    Some((busy as f64 / total as f64).clamp(0.0, 1.0))
}

/// (share of memory in use, total bytes) from `/proc/meminfo`'s
/// `MemTotal` and `MemAvailable` (kB).
pub fn parse_meminfo(text: &str) -> Option<(f64, i64)> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    let total = field("MemTotal:").filter(|t| *t > 0)?;
    let available = field("MemAvailable:")?.min(total);
    let used = 1.0 - available as f64 / total as f64;
    Some((used, i64::try_from(total.saturating_mul(1024)).ok()?))
}

/// Reads load figures from a `/proc` directory (another root in tests).
pub struct Sampler {
    proc_dir: std::path::PathBuf,
    last_stat: Option<(u64, u64)>,
}

impl Sampler {
    pub fn new(proc_dir: impl Into<std::path::PathBuf>) -> Sampler {
        Sampler {
            proc_dir: proc_dir.into(),
            last_stat: None,
        }
    }

    /// The figures now; CPU is the usage since the previous call (none on
    /// the first). A file missing or unreadable leaves its figure out.
    pub fn sample(&mut self) -> NodeLoad {
        let read = |name: &str| std::fs::read_to_string(self.proc_dir.join(name)).ok();
        let stat = read("stat").as_deref().and_then(parse_stat);
        let cpu = match (self.last_stat, stat) {
            (Some(before), Some(after)) => cpu_between(before, after),
            _ => None,
        };
        if stat.is_some() {
            self.last_stat = stat;
        }
        let memory = read("meminfo").as_deref().and_then(parse_meminfo);
        NodeLoad {
            cpu,
            load1: read("loadavg").as_deref().and_then(parse_loadavg),
            mem_used: memory.map(|m| m.0),
            mem_total_bytes: memory.map(|m| m.1),
        }
    }
}

impl Default for Sampler {
    fn default() -> Sampler {
        Sampler::new("/proc")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg() {
        let check =
            |text: &str, expect: Option<f64>| assert_eq!(parse_loadavg(text), expect, "{text:?}");
        check("0.52 0.58 0.59 2/713 12345\n", Some(0.52));
        check("12.00 1 1 1/1 1", Some(12.0));
        check("", None);
        check("x 1 1", None);
        check("-1 0 0", None);
        check("NaN 0 0", None);
    }

    #[test]
    fn stat() {
        let check = |text: &str, expect: Option<(u64, u64)>| {
            assert_eq!(parse_stat(text), expect, "{text:?}")
        };
        // user nice system idle iowait irq softirq steal guest guest_nice
        check(
            "cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 1 2 3 4\n",
            Some((150, 1000)),
        );
        check("cpu  1 2 3 4\n", Some((6, 10)));
        check("cpu0 1 2 3 4\n", None);
        check("cpu  1 2\n", None);
        check("cpu  1 x 3 4 5\n", None);
        check("", None);
    }

    #[test]
    fn cpu_usage_between_readings() {
        let check =
            |a, b, expect: Option<f64>| assert_eq!(cpu_between(a, b), expect, "{a:?} {b:?}");
        check((100, 1000), (150, 1100), Some(0.5));
        check((100, 1000), (100, 1100), Some(0.0));
        check((100, 1000), (300, 1100), Some(1.0));
        check((100, 1000), (100, 1000), None);
        check((100, 1000), (50, 900), None);
    }

    #[test]
    fn meminfo() {
        let check = |text: &str, expect: Option<(f64, i64)>| {
            assert_eq!(parse_meminfo(text), expect, "{text:?}")
        };
        check(
            "MemTotal:       1000 kB\nMemFree:  10 kB\nMemAvailable:    250 kB\n",
            Some((0.75, 1_024_000)),
        );
        check(
            "MemTotal: 1000 kB\nMemAvailable: 2000 kB\n",
            Some((0.0, 1_024_000)),
        );
        check("MemTotal: 0 kB\nMemAvailable: 0 kB\n", None);
        check("MemTotal: 1000 kB\n", None);
        check("", None);
    }

    #[test]
    fn the_sampler_reads_this_host() {
        let mut sampler = Sampler::default();
        let first = sampler.sample();
        assert!(first.cpu.is_none(), "nothing to compare with yet");
        assert!(first.load1.is_some_and(|l| l >= 0.0), "{first:?}");
        assert!(
            first.mem_used.is_some_and(|m| (0.0..=1.0).contains(&m)),
            "{first:?}"
        );
        assert!(first.mem_total_bytes.is_some_and(|m| m > 0), "{first:?}");
        // Spend a few ticks so the counters move.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(50);
        while std::time::Instant::now() < until {
            std::hint::black_box(0u64);
        }
        let second = sampler.sample();
        assert!(
            second.cpu.is_some_and(|c| (0.0..=1.0).contains(&c)),
            "{second:?}"
        );
    }

    #[test]
    fn a_missing_proc_leaves_every_figure_out() {
        let mut sampler = Sampler::new("/nonexistent-proc");
        assert_eq!(sampler.sample(), NodeLoad::default());
        assert_eq!(sampler.sample(), NodeLoad::default());
    }
}

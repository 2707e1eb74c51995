//! `kiln top`: the dashboard (`GET /api/v1/dashboard/stats`) in the
//! terminal, redrawn every two seconds with plain ANSI codes; `--once`
//! prints one frame and exits.

use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::Client;

#[derive(Args)]
pub struct TopArgs {
    /// `1h`, `24h` or `7d`.
    #[arg(long, default_value = "1h")]
    range: String,
    /// The deployment's key only: one tenant's figures.
    #[arg(long)]
    tenant: Option<String>,
    /// Print one frame and exit.
    #[arg(long)]
    once: bool,
    /// Seconds between frames.
    #[arg(long, default_value_t = 2)]
    every: u64,
}

pub async fn top(client: Client, args: TopArgs) -> anyhow::Result<i32> {
    let mut path = match args.range.as_str() {
        "1h" | "24h" | "7d" => format!("/api/v1/dashboard/stats?range={}", args.range),
        other => anyhow::bail!("unknown range {other:?}: use 1h, 24h or 7d"),
    };
    if let Some(tenant) = &args.tenant {
        kiln_core::validate_name("tenant", tenant)?;
        write!(path, "&tenant={tenant}")?;
    }
    if args.once {
        print!("{}", frame(&client.get(&path).await?));
        return Ok(0);
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(args.every.max(1)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                println!();
                return Ok(0);
            }
        }
        // Home, clear, frame: the whole screen is redrawn each time.
        match client.get(&path).await {
            Ok(stats) => print!("\x1b[H\x1b[2J{}", frame(&stats)),
            Err(error) => print!("\x1b[H\x1b[2Jkiln top: {error:#}\n(retrying)\n"),
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn ms(v: &Value) -> String {
    match v.as_i64() {
        None => "-".into(),
        Some(ms) if ms >= 10_000 => format!("{:.1} s", ms as f64 / 1000.0),
        Some(ms) => format!("{ms} ms"),
    }
}

/// Bars for a series, scaled to its largest value.
fn sparkline(values: &[i64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let top = values.iter().copied().max().unwrap_or(0).max(1);
    values
        .iter()
        .map(|v| {
            if *v <= 0 {
                ' '
            } else {
                BARS[((*v * 7 + top - 1) / top).clamp(0, 7) as usize]
            }
        })
        .collect()
}

/// One screen of the dashboard's JSON.
pub fn frame(stats: &Value) -> String {
    let mut out = String::new();
    let whose = stats["tenant"]
        .as_str()
        .map(|t| format!("tenant {t}"))
        .unwrap_or_else(|| "every tenant".into());
    let _ = writeln!(
        out,
        "kiln top · {whose} · last {} · {}",
        stats["range"].as_str().unwrap_or("?"),
        stats["to"].as_str().unwrap_or("?")
    );
    let s = &stats["jobs_by_status"];
    let _ = writeln!(
        out,
        "jobs      queued {}  scheduled {}  running {}  |  succeeded {}  failed {}  dead {}  cancelled {}",
        int(&s["queued"]),
        int(&s["scheduled"]),
        int(&s["running"]),
        int(&s["succeeded"]),
        int(&s["failed"]),
        int(&s["dead"]),
        int(&s["cancelled"])
    );
    let points = stats["throughput"].as_array().cloned().unwrap_or_default();
    let step = int(&stats["step_seconds"]).max(1);
    let t = &stats["totals"];
    let per_minute = |n: i64| n as f64 * 60.0 / (step as f64 * points.len().max(1) as f64);
    let _ = writeln!(
        out,
        "per min   enqueued {:.1}  started {:.1}  succeeded {:.1}  failed {:.1}  dead {:.1}  retried {:.1}",
        per_minute(int(&t["enqueued"])),
        per_minute(int(&t["started"])),
        per_minute(int(&t["succeeded"])),
        per_minute(int(&t["failed"])),
        per_minute(int(&t["dead"])),
        per_minute(int(&t["retried"]))
    );
    for (label, field) in [
        ("enqueued", "enqueued"),
        ("succeeded", "succeeded"),
        ("failed", "failed"),
    ] {
        let values: Vec<i64> = points.iter().map(|p| int(&p[field])).collect();
        let _ = writeln!(out, "{label:<9} |{}|", sparkline(&values));
    }
    for (label, key) in [("enq→start", "enqueue_to_start"), ("run time", "run_time")] {
        let l = &stats["latency"][key];
        let _ = writeln!(
            out,
            "{label:<9} p50 {}  p95 {}  p99 {}  ({} samples)",
            ms(&l["p50_ms"]),
            ms(&l["p95_ms"]),
            ms(&l["p99_ms"]),
            int(&l["count"])
        );
    }
    for (label, key) in [("by kind", "by_kind"), ("by queue", "by_queue")] {
        let rows = stats["failures"][key]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let line: Vec<String> = rows
            .iter()
            .map(|r| {
                let rate = r["failure_rate"]
                    .as_f64()
                    .map(|f| format!("{:.1}%", f * 100.0))
                    .unwrap_or_else(|| "-".into());
                format!(
                    "{} {rate} ({}/{})",
                    r["name"].as_str().unwrap_or("?"),
                    int(&r["failed"]) + int(&r["dead"]),
                    int(&r["succeeded"]) + int(&r["failed"]) + int(&r["dead"])
                )
            })
            .collect();
        let _ = writeln!(out, "failures {label}: {}", line.join("  "));
    }
    let _ = writeln!(
        out,
        "{:<16} {:<20} {:>9} {:>9}  OLDEST WAITING",
        "TENANT", "QUEUE", "QUEUED", "SCHEDULED"
    );
    for q in stats["queues"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16} {:<20} {:>9} {:>9}  {}",
            q["tenant"].as_str().unwrap_or("?"),
            q["queue"].as_str().unwrap_or("?"),
            int(&q["queued"]),
            int(&q["scheduled"]),
            ms(&q["oldest_age_ms"])
        );
    }
    let mut last = format!("incidents open {}", int(&stats["incidents_open"]));
    if let Some(d) = stats["deployment"].as_object() {
        let _ = write!(
            last,
            "  ·  nodes online {}  ·  VMs live {}",
            d.get("nodes_online").map(int).unwrap_or(0),
            d.get("vms_live").map(int).unwrap_or(0)
        );
    }
    let _ = writeln!(out, "{last}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_scale_to_the_largest_value() {
        assert_eq!(sparkline(&[0, 1, 4, 8]), " ▂▅█");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[0, 0]), "  ");
    }
}

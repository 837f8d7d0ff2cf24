//! Where the CPU went during a scenario, from /proc: each of Herald's
//! processes, Postgres (all its backends), Redis, the bench itself, and
//! everything else on the machine (other people's builds and tests show up
//! there, which is how a noisy run is recognised).

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

pub struct Snapshot {
    at: Instant,
    by_group: BTreeMap<&'static str, u64>,
    /// Busy and total ticks of the whole machine (/proc/stat).
    busy: u64,
    total: u64,
}

fn group(comm: &str) -> &'static str {
    // comm is cut to 15 bytes.
    match comm {
        "herald-api" => "api",
        c if c.starts_with("herald-email") => "email-worker",
        c if c.starts_with("herald-push") => "push-worker",
        c if c.starts_with("herald-inapp") => "inapp-worker",
        c if c.starts_with("herald-bench") => "bench",
        "postgres" => "postgres",
        c if c.starts_with("redis-server") => "redis",
        _ => "other",
    }
}

pub fn snapshot() -> Snapshot {
    let mut by_group: BTreeMap<&'static str, u64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            // After ")": state is field 3; utime and stime are fields 14, 15.
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let ticks = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            *by_group.entry(group(comm)).or_default() += ticks;
        }
    }
    let (mut busy, mut total) = (0, 0);
    if let Ok(stat) = std::fs::read_to_string("/proc/stat")
        && let Some(line) = stat.lines().next()
    {
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        total = v.iter().take(8).sum();
        // idle and iowait are fields 4 and 5.
        busy = total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0);
    }
    Snapshot {
        at: Instant::now(),
        by_group,
        busy,
        total,
    }
}

/// Cores used per group between two snapshots, plus `other` (the machine's
/// busy time not accounted to a group, e.g. processes that came and went)
/// and `idle`.
pub fn usage(a: &Snapshot, b: &Snapshot) -> Vec<(&'static str, f64)> {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let mut out = Vec::new();
    let mut accounted = 0.0;
    for name in [
        "api",
        "email-worker",
        "push-worker",
        "inapp-worker",
        "postgres",
        "redis",
        "bench",
    ] {
        let d = b
            .by_group
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(a.by_group.get(name).copied().unwrap_or(0));
        let cores = d as f64 / TICKS / secs;
        accounted += cores;
        out.push((name, cores));
    }
    let busy = b.busy.saturating_sub(a.busy) as f64 / TICKS / secs;
    let total = b.total.saturating_sub(a.total) as f64 / TICKS / secs;
    out.push(("other", (busy - accounted).max(0.0)));
    out.push(("idle", (total - busy).max(0.0)));
    out
}

pub fn describe(usage: &[(&str, f64)]) -> String {
    usage
        .iter()
        .map(|(n, c)| format!("{n} {c:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cores one group used (0 when it is not in `usage`).
pub fn cores(usage: &[(&str, f64)], name: &str) -> f64 {
    usage.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, c)| *c)
}

/// What a target rate asks of this machine, at the costs a scenario
/// measured: CPU time per unit of work for each process group, the cores
/// the target would take at that cost, and a floor that Herald cannot
/// lower: Postgres at the cost of the database ceiling's best batching
/// (`pg_floor_us`, Herald's own statements with nothing else running), the
/// bench process (load generator and sinks, which stand in for Herald's
/// clients and providers) and `floor_parts`, each a part of the workers' or
/// the API's work measured alone at its cheapest (the ceiling's client side
/// of the statements; alone.rs: the client side of the protocols the sinks
/// answer, the queue's worker side, Redis, the API's HTTP side). Parts measured alone, with the machine
/// to themselves and their best batching, cost no more than they do side
/// by side, so their sum is a lower bound: a floor above the machine's
/// cores puts the target out of reach here, however lean the rest of
/// Herald's processes get.
pub struct Reach {
    pub text: String,
    /// The floor per unit of work, µs.
    pub floor_us: Option<f64>,
    /// Cores the floor needs at the target rate.
    pub floor_cores: Option<f64>,
    pub json: serde_json::Value,
}

/// Cores of this machine (2 when it cannot be read).
pub fn machine_cores() -> f64 {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get) as f64
}

pub fn reach(
    usage: &[(&str, f64)],
    rate: f64,
    unit: &str,
    target: f64,
    pg_floor_us: Option<f64>,
    floor_parts: &[(&str, f64)],
) -> Reach {
    let us = |cores: f64| cores * 1e6 / rate.max(1e-9);
    let mut parts = Vec::new();
    let mut total = 0.0;
    let mut by_group = serde_json::Map::new();
    for (name, c) in usage {
        if matches!(*name, "idle" | "other") || *c < 0.005 {
            continue;
        }
        total += us(*c);
        parts.push(format!("{name} {:.0}", us(*c)));
        by_group.insert((*name).to_owned(), serde_json::json!(us(*c)));
    }
    let machine = machine_cores();
    let bench_us = us(cores(usage, "bench"));
    let parts_us: f64 = floor_parts.iter().map(|(_, us)| *us).sum();
    let floor_us = pg_floor_us.map(|pg| pg + bench_us + parts_us);
    let floor_cores = floor_us.map(|f| f * target / 1e6);
    let mut text = format!(
        "{} µs per {unit} ({total:.0} in all); {target:.0}/s at this cost takes {:.2} cores of {machine:.0}",
        parts.join(", "),
        total * target / 1e6
    );
    if let (Some(pg), Some(cores)) = (pg_floor_us, floor_cores) {
        text.push_str(&format!(
            "; floor {cores:.2} cores (Postgres at its ceiling's cost {pg:.0} µs + load generator and sinks {bench_us:.0} µs"
        ));
        for (what, us) in floor_parts {
            text.push_str(&format!(" + {what} {us:.0} µs"));
        }
        text.push(')');
    }
    Reach {
        text,
        floor_us,
        floor_cores,
        json: serde_json::json!({"cpu_us_per_unit": by_group, "total_us": total, "target": target,
                                 "cores_at_target": total * target / 1e6, "floor_us": floor_us, "floor_parts_us": floor_parts.iter().map(|(what, us)| ((*what).to_owned(), serde_json::json!(us))).collect::<serde_json::Map<_, _>>(),
                                 "floor_cores_at_target": floor_cores, "machine_cores": machine}),
    }
}

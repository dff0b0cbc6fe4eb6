//! CPU time by process, read from /proc: the benchmark client (this
//! process), the gateway and the database server. On a machine whose cores
//! all three share, a ratio of rates is a ratio of CPU spent per call, so
//! the report says where that CPU went.

use std::collections::HashMap;
use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub client: Duration,
    pub gateway: Duration,
    pub database: Duration,
}

/// CPU used so far by each process, to take differences from.
pub struct Snapshot {
    client: Duration,
    gateway: Option<(u32, Duration)>,
    database: &'static str,
    /// By pid: backends come and go with connections, so only the CPU of
    /// processes alive at both ends (or started in between) is counted.
    database_pids: HashMap<u32, Duration>,
}

/// utime + stime of one process, from the fields after its `(comm)`; with
/// `children`, also the times of the children it has waited for.
fn stat_cpu(stat: &str, children: bool) -> Option<Duration> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 to 17 of stat(5); the text after ")" starts at field 3.
    let last = if children { 14 } else { 12 };
    let mut ticks = 0u64;
    for field in 11..=last {
        ticks += fields.get(field)?.parse::<u64>().ok()?;
    }
    Some(Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND))
}

fn process_cpu(stat: &str) -> Option<Duration> {
    stat_cpu(stat, false)
}

/// This process's CPU with that of the commands it ran and waited for
/// (`psql`, `mariadb`: the direct clients of the load figures).
fn own_cpu() -> Duration {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s, true))
        .unwrap_or_default()
}

fn pid_cpu(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| process_cpu(&s))
        .unwrap_or_default()
}

/// Every process named `name` (the database server's backends and helpers), by pid.
fn named_cpu(name: &str) -> HashMap<u32, Duration> {
    if name.is_empty() {
        return HashMap::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let comm = stat.split_once('(')?.1.rsplit_once(')')?.0;
            // Without the children it has reaped: PostgreSQL's postmaster
            // would bring in, at a moment of its choosing, the whole CPU of
            // backends that ended (the direct pool's, after its phase) and
            // of autovacuum workers.
            (comm == name).then_some((pid, process_cpu(&stat)?))
        })
        .collect()
}

impl Snapshot {
    /// CPU used so far by this process, `gateway` and the processes named `database`.
    pub fn now(gateway: Option<u32>, database: &'static str) -> Snapshot {
        Snapshot {
            client: own_cpu(),
            gateway: gateway.map(|pid| (pid, pid_cpu(pid))),
            database,
            database_pids: named_cpu(database),
        }
    }

    /// CPU used from this snapshot until now.
    pub fn elapsed(&self) -> Cpu {
        let later = Snapshot::now(self.gateway.map(|(pid, _)| pid), self.database);
        let database = later
            .database_pids
            .iter()
            .map(|(pid, cpu)| cpu.saturating_sub(self.database_pids.get(pid).copied().unwrap_or_default()))
            .sum();
        Cpu {
            client: later.client.saturating_sub(self.client),
            gateway: match (later.gateway, self.gateway) {
                (Some((_, after)), Some((_, before))) => after.saturating_sub(before),
                _ => Duration::ZERO,
            },
            database,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, other: Cpu) {
        self.client += other.client;
        self.gateway += other.gateway;
        self.database += other.database;
    }
}

impl Cpu {
    pub fn total(&self) -> Duration {
        self.client + self.gateway + self.database
    }

    /// "client 12.0 µs, gateway 30.1 µs, PostgreSQL 40.2 µs" per unit of
    /// work; no gateway figure where there is no gateway, and no database
    /// figure for an unnamed (embedded) one.
    pub fn per(&self, units: f64, database: &str) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / units.max(1.0);
        let gateway = if self.gateway.is_zero() {
            String::new()
        } else {
            format!(", gateway {:.1} µs", us(self.gateway))
        };
        let database = if database.is_empty() {
            String::new()
        } else {
            format!(", {database} {:.1} µs", us(self.database))
        };
        format!("client {:.1} µs{gateway}{database}", us(self.client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_and_system_time_after_the_command_name() {
        // A command name with spaces and parentheses, as comm may have.
        let stat = "4242 (tokio (rt) x) S 1 2 3 4 5 6 7 8 9 10 250 50 100 50 20 0 9 0 100 200 300";
        assert_eq!(process_cpu(stat), Some(Duration::from_secs(3)));
        // With the children waited for (cutime, cstime).
        assert_eq!(stat_cpu(stat, true), Some(Duration::from_millis(4500)));
    }
}

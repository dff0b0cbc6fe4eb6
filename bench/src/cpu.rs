//! CPU time by process, read from /proc: the benchmark client (this
//! process), the gateway and the database server. On a machine whose cores
//! all three share, a ratio of rates is a ratio of CPU spent per call, so
//! the report says where that CPU went.

use std::time::Duration;

/// Clock ticks per second of /proc/<pid>/stat times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub client: Duration,
    pub gateway: Duration,
    pub database: Duration,
}

/// utime + stime of one process, from the fields after its `(comm)`.
fn process_cpu(stat: &str) -> Option<Duration> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); the text after ")" starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND))
}

fn pid_cpu(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| process_cpu(&s))
        .unwrap_or_default()
}

/// Every process named `name` (the database server's backends and helpers).
fn named_cpu(name: &str) -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| s.split_once('(').and_then(|(_, rest)| rest.rsplit_once(')')).map(|(comm, _)| comm) == Some(name))
        .filter_map(|s| process_cpu(&s))
        .sum()
}

impl Cpu {
    /// CPU used so far by this process, `gateway` and the processes named `database`.
    pub fn now(gateway: Option<u32>, database: &str) -> Cpu {
        Cpu {
            client: pid_cpu(std::process::id()),
            gateway: gateway.map(pid_cpu).unwrap_or_default(),
            database: named_cpu(database),
        }
    }

    /// CPU used between `earlier` and `self`.
    pub fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            client: self.client.saturating_sub(earlier.client),
            gateway: self.gateway.saturating_sub(earlier.gateway),
            database: self.database.saturating_sub(earlier.database),
        }
    }

    pub fn total(&self) -> Duration {
        self.client + self.gateway + self.database
    }

    /// "client 12.0 µs, gateway 30.1 µs, PostgreSQL 40.2 µs" per unit of work.
    pub fn per(&self, units: f64, database: &str) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / units.max(1.0);
        format!(
            "client {:.1} µs, gateway {:.1} µs, {database} {:.1} µs",
            us(self.client),
            us(self.gateway),
            us(self.database)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_and_system_time_after_the_command_name() {
        // A command name with spaces and parentheses, as comm may have.
        let stat = "4242 (tokio (rt) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 100 200 300";
        assert_eq!(process_cpu(stat), Some(Duration::from_secs(3)));
    }
}

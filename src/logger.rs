//! A tiny stderr logger for both binaries: `2026-11-22T11:21:37Z INFO  message` (and, for
//! `wisp demo`, the same lines in two files).
//!
//! The level comes from `WISP_LOG` (error, warn, info, debug, trace); the default is info.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

struct Stderr;

static LOGGER: Stderr = Stderr;

/// The level `WISP_LOG` asks for.
fn level() -> LevelFilter {
    match std::env::var("WISP_LOG").as_deref() {
        Ok("error") => LevelFilter::Error,
        Ok("warn") => LevelFilter::Warn,
        Ok("debug") => LevelFilter::Debug,
        Ok("trace") => LevelFilter::Trace,
        Ok("off") => LevelFilter::Off,
        _ => LevelFilter::Info,
    }
}

/// Install the logger; later calls are ignored.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level());
    }
}

/// The start of every line: the UTC time and the level.
struct Prefix(Level);

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, mo, d, h, mi, s) = utc_now();
        write!(f, "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z {}", level_name(self.0))
    }
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN ",
        Level::Info => "INFO ",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

/// Log lines of the agent (`wisp::agent::*`) to one file and all others to another: `wisp demo`
/// runs the controller and an agent in one process and keeps its terminal for the build's log.
#[cfg(feature = "controller")]
struct Files {
    controller: std::sync::Mutex<std::fs::File>,
    agent: std::sync::Mutex<std::fs::File>,
}

#[cfg(feature = "controller")]
impl Log for Files {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!("{} {}\n", Prefix(r.level()), r.args());
        let file = if r.target().starts_with("wisp::agent") { &self.agent } else { &self.controller };
        let _ = file.lock().unwrap_or_else(|e| e.into_inner()).write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install a logger that appends the agent's lines to `agent` and all others to `controller`
/// instead of writing to stderr; later calls (of this or [`init`]) are ignored.
#[cfg(feature = "controller")]
pub fn init_files(controller: std::fs::File, agent: std::fs::File) {
    let files = Files { controller: controller.into(), agent: agent.into() };
    if log::set_logger(Box::leak(Box::new(files))).is_ok() {
        log::set_max_level(level());
    }
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // One write per line so lines from threads do not interleave.
        let mut line = heapless::String::<512>::new();
        use std::fmt::Write as _;
        let prefix = Prefix(r.level());
        let _ = write!(line, "{prefix} ");
        // A message that does not fit (a write fails part way) goes out through a heap String.
        let fits = write!(line, "{}", r.args()).is_ok();
        if !fits || line.len() >= 511 {
            let _ = std::io::stderr().write_all(format!("{prefix} {}\n", r.args()).as_bytes());
        } else {
            let _ = line.push('\n');
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Current UTC time as (year, month, day, hour, minute, second).
pub fn utc_now() -> (i64, u32, u32, u32, u32, u32) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    utc(secs)
}

/// Civil UTC date and time of a Unix timestamp (Howard Hinnant's days-to-civil algorithm).
pub fn utc(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, (tod / 3600) as u32, (tod % 3600 / 60) as u32, (tod % 60) as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates_are_right() {
        assert_eq!(super::utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(super::utc(1_795_346_497), (2026, 11, 22, 11, 21, 37));
        assert_eq!(super::utc(951_782_400), (2000, 2, 29, 0, 0, 0));
    }
}

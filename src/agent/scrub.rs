//! Scrubbing the node secret out of the agent's own command line and environment as the kernel
//! shows them in `/proc/PID/cmdline` and `/proc/PID/environ`.
//!
//! Steps run as the agent's user, so they may read both files of their parent. Those files are
//! the bytes between `arg_start`..`arg_end` and `env_start`..`env_end` of the agent's memory
//! (`/proc/self/stat`), where the kernel put them at exec; `std::env::remove_var` only drops a
//! pointer to them. So the bytes are overwritten where they lie, through `/proc/self/mem` (which
//! fails cleanly on a bad address, where a raw pointer write would not). No libc involved: the
//! same on glibc and static musl, and as PID 1.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// Environment variables that may hold a node secret: they are scrubbed whatever their value.
pub const SECRET_VARS: [&str; 2] = ["JENKINS_SECRET", "WISP_SECRET"];

/// Largest argument or environment area handled (Linux allows 2 MiB of arguments by default, a
/// quarter of the stack limit when that is raised).
const MAX_AREA: u64 = 16 << 20;

/// The fill written over a secret (same length, so the areas keep their shape).
const FILL: u8 = b'*';

/// Overwrite every argument equal to `secret` and the value of every `SECRET_VARS` entry of the
/// environment, then drop those variables from the environment. Returns how many strings were
/// overwritten. Call at start, before any thread exists (`remove_var` is not thread-safe).
pub fn scrub_secret(secret: &str) -> Result<usize, String> {
    let mut n = 0;
    let (args, env) = areas()?;
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| format!("cannot open /proc/self/mem: {e}"))?;
    if !secret.is_empty() {
        n += scrub_area(&mem, args, |s| (s == secret.as_bytes()).then_some(0))?;
    }
    n += scrub_area(&mem, env, |s| {
        SECRET_VARS.iter().find_map(|v| {
            let key = v.as_bytes();
            (s.len() > key.len() && s.starts_with(key) && s[key.len()] == b'=').then_some(key.len() + 1)
        })
    })?;
    for v in SECRET_VARS {
        std::env::remove_var(v);
    }
    Ok(n)
}

/// A span of the process's memory: `(start, end)` addresses.
type Area = (u64, u64);

/// The argument and environment areas, from `/proc/self/stat`.
fn areas() -> Result<(Area, Area), String> {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| format!("cannot read /proc/self/stat: {e}"))?;
    // Fields after the command name (which may hold anything, so find its closing parenthesis
    // from the end): field 3 (state) first; arg_start..env_end are fields 48 to 51.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).ok_or("/proc/self/stat is unreadable")?;
    let f: Vec<u64> = rest.split_whitespace().skip(45).take(4).filter_map(|x| x.parse().ok()).collect();
    match f[..] {
        [a0, a1, e0, e1] if a0 > 0 && a0 <= a1 && e0 > 0 && e0 <= e1 => Ok(((a0, a1), (e0, e1))),
        _ => Err("/proc/self/stat gives no argument and environment addresses (under an emulator such as qemu-user, or Linux before 3.5)".into()),
    }
}

/// Overwrite the strings of one NUL-separated area for which `pick` gives the offset their
/// secret part starts at.
fn scrub_area(
    mem: &File,
    (start, end): (u64, u64),
    pick: impl Fn(&[u8]) -> Option<usize>,
) -> Result<usize, String> {
    let len = end - start;
    if len > MAX_AREA {
        return Err(format!("an argument or environment area of {len} bytes is larger than expected"));
    }
    let mut buf = vec![0u8; len as usize];
    mem.read_exact_at(&mut buf, start).map_err(|e| format!("cannot read own memory at {start:#x}: {e}"))?;
    let mut n = 0;
    let mut at = 0;
    for s in buf.split(|b| *b == 0) {
        if let Some(skip) = pick(s) {
            let fill = vec![FILL; s.len() - skip];
            let addr = start + (at + skip) as u64;
            mem.write_all_at(&fill, addr)
                .map_err(|e| format!("cannot write own memory at {addr:#x}: {e}"))?;
            n += 1;
        }
        at += s.len() + 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_areas_hold_this_process_arguments() {
        let ((a0, a1), (e0, e1)) = areas().unwrap();
        assert!(a0 < a1 && a1 <= e0 && e0 < e1);
        let mem = File::open("/proc/self/mem").unwrap();
        let mut buf = vec![0u8; (a1 - a0) as usize];
        mem.read_exact_at(&mut buf, a0).unwrap();
        let first = buf.split(|b| *b == 0).next().unwrap();
        assert_eq!(first, std::env::args().next().unwrap().as_bytes());
    }
}

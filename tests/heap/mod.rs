//! The agent's heap stays within a fixed budget while a step writes 1 GiB: a counting global
//! allocator measures every allocation made by the agent's threads in this process (the
//! controller is a separate process; the test's own thread is excluded). Each transport is
//! measured in its own test binary (`agent_heap_tcp`, `agent_heap_ws`), so one agent's heap never
//! shows up in the other's figure. The same run shows that on a live link the output never goes
//! through the agent's disk spool, however fast the step writes: the agent's own log line for
//! the step says how many bytes it wrote to disk, and that is 0.

use super::common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicIsize, AtomicU64, Ordering};
use std::time::Duration;

/// The budget the issue asks for: the agent's live heap never exceeds this while streaming.
pub const BUDGET: isize = 256 * 1024;

struct Counting;

static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    static EXCLUDED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    !EXCLUDED.try_with(|e| e.get()).unwrap_or(true)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && counted() {
            let now = CURRENT.fetch_add(layout.size() as isize, Ordering::SeqCst) + layout.size() as isize;
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            CURRENT.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && counted() {
            let delta = new_size as isize - layout.size() as isize;
            let now = CURRENT.fetch_add(delta, Ordering::SeqCst) + delta;
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Bytes the agent's step wrote to its disk spool, from the step's "done" log line (`u64::MAX`
/// until that line is seen).
static SPILLED: AtomicU64 = AtomicU64::new(u64::MAX);

/// The agent's log, read for that one line without allocating (the line is formatted into a
/// buffer on the stack, so the logger adds nothing to the heap it measures).
struct SpillLog;

struct Line {
    buf: [u8; 512],
    len: usize,
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl log::Log for SpillLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        let mut line = Line { buf: [0; 512], len: 0 };
        let _ = fmt::write(&mut line, *r.args());
        let bytes = &line.buf[..line.len];
        let text = std::str::from_utf8(bytes)
            .unwrap_or_else(|e| std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default());
        if let Some(head) = text.strip_suffix(" bytes of it written to disk") {
            if let Some(n) = head.rsplit(", ").next().and_then(|n| n.parse().ok()) {
                SPILLED.store(n, Ordering::SeqCst);
            }
        }
    }
    fn flush(&self) {}
}

static LOGGER: SpillLog = SpillLog;

/// Start an agent in this process, let a step write 1 GiB through it, and return its heap when
/// connected and idle and its peak over its whole life (connecting included).
fn stream_one_gib(ws: bool) -> (isize, isize) {
    let ctl = Controller::start();
    let work = TempDir::new("heap");
    let name = if ws { "heap-ws" } else { "heap-tcp" };
    let secret = ctl.add_node(name, "linux", if ws { &[] } else { &["--tcp"] });
    let (url, direct, work_dir) = (ctl.url(), ctl.agent_addr.clone(), work.path().to_path_buf());
    let name2 = name.to_string();
    std::thread::spawn(move || {
        // Everything the agent owns is allocated on this thread (or threads it starts).
        let mode = if ws { wisp::agent::Mode::WebSocket } else { wisp::agent::Mode::Direct(direct.clone()) };
        let cfg = wisp::agent::Config {
            url: url.clone(),
            name: name2.clone(),
            secret: secret.clone(),
            mode,
            work_dir,
            trust: Default::default(),
            spool_cap: wisp::agent::DEFAULT_SPOOL_CAP,
        };
        let _ = wisp::agent::run(cfg, wisp::agent::Shutdown::never());
    });
    ctl.wait_online(name);
    let idle = CURRENT.load(Ordering::SeqCst);
    let id = ctl.submit(&format!(
        "name: big\nagent: {{label: {name}}}\nsteps:\n  - sh: head -c 1073741824 /dev/zero; echo done\n"
    ));
    let b = ctl.wait_build_state(id, Duration::from_secs(600));
    assert_eq!(b["state"], "success", "{b}\n{}", ctl.log_text());
    assert_eq!(b["steps"][0]["bytes"], 1_073_741_824u64 + 5, "every byte stored: {b}");
    // The agent logs the step's end once the controller has acknowledged its exit.
    wait_for("the agent to log the step's end", Duration::from_secs(30), || {
        (SPILLED.load(Ordering::SeqCst) != u64::MAX).then_some(())
    });
    (idle, PEAK.load(Ordering::SeqCst))
}

/// The test body for one transport.
pub fn check(ws: bool) {
    EXCLUDED.with(|e| e.set(true));
    log::set_logger(&LOGGER).expect("the only logger");
    log::set_max_level(log::LevelFilter::Info);
    // What other threads (libtest's own) hold before the agent starts is not the agent's.
    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let (idle, peak) = stream_one_gib(ws);
    let (idle, peak) = (idle - before, peak - before);
    let transport = if ws { "websocket" } else { "tcp" };
    println!(
        "agent heap ({transport}): {idle} bytes connected and idle, peak {peak} bytes while streaming 1 GiB (budget {BUDGET})"
    );
    assert!(peak > 0 && idle > 0, "the counting allocator saw the agent");
    assert!(peak <= BUDGET, "{transport}: peak agent heap {peak} bytes is over the {BUDGET}-byte budget");
    let spilled = SPILLED.load(Ordering::SeqCst);
    println!("agent spool ({transport}): {spilled} bytes of 1 GiB written to disk");
    assert_eq!(spilled, 0, "{transport}: on a live link the output went through the agent's disk");
}

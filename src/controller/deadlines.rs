//! Deadlines of requests and of agent links, all served by one timer.
//!
//! Every HTTP request has a deadline (hyper's header timeout) and so has every `?wait`. With a
//! reactor timer each, every request registered a timer, and async-io wakes the thread that
//! waits on I/O for each new timer: a wake-up and two context switches per request, about a
//! tenth of the controller's CPU per trivial build. Here the deadlines sit in one ordered map
//! and a single task sleeps until the earliest. Deadlines mostly come in later than the ones
//! already waiting (now + the same timeout), so adding one costs a map insert and nothing else;
//! only a deadline earlier than the armed one wakes the task, to re-arm. A [`Sleep`] fires on
//! time; a [`Coarse`] one (each agent link's next ping or silence check) on a grid, so that
//! those of thousands of links fire together.

use event_listener::Event;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

type Key = (Instant, u64);

#[derive(Default)]
struct Inner {
    waiting: BTreeMap<Key, Waker>,
    next_id: u64,
    /// When the task's timer is set to fire (None: not set).
    armed: Option<Instant>,
}

/// The deadlines and the task that fires them.
pub struct Deadlines {
    inner: Mutex<Inner>,
    /// Wakes the task to re-arm for an earlier deadline.
    rearm: Event,
    /// Where the grid of [`Coarse`] deadlines starts.
    epoch: Instant,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self { inner: Mutex::default(), rearm: Event::new(), epoch: Instant::now() }
    }
}

impl Deadlines {
    /// Create them; `run` must be spawned for any deadline to fire.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fire deadlines as they come, forever.
    pub async fn run(self: Arc<Self>) {
        let mut timer = smol::Timer::never();
        loop {
            let rearm = self.rearm.listen();
            let due: Vec<Waker> = {
                let mut inner = self.inner();
                let now = Instant::now();
                let later = inner.waiting.split_off(&(now, u64::MAX));
                let due = std::mem::replace(&mut inner.waiting, later).into_values().collect();
                inner.armed = inner.waiting.keys().next().map(|k| k.0);
                match inner.armed {
                    Some(t) => timer.set_at(t),
                    None => timer = smol::Timer::never(),
                }
                due
            };
            due.into_iter().for_each(Waker::wake);
            smol::future::or(rearm, async {
                (&mut timer).await;
            })
            .await;
        }
    }

    /// A future that is ready at `deadline`.
    pub fn sleep_until(self: &Arc<Self>, deadline: Instant) -> Sleep {
        Sleep { deadlines: self.clone(), deadline, key: None }
    }

    /// A future that is ready after `d`.
    pub fn sleep(self: &Arc<Self>, d: Duration) -> Sleep {
        self.sleep_until(Instant::now() + d)
    }

    /// A future that is ready at `deadline` rounded up to a multiple of `grid`: see [`Coarse`].
    pub fn coarse_until(self: &Arc<Self>, deadline: Instant, grid: Duration) -> Coarse {
        Coarse { sleep: self.sleep_until(self.round_up(deadline, grid)), grid }
    }

    fn round_up(&self, t: Instant, grid: Duration) -> Instant {
        let g = grid.as_nanos().max(1);
        let ticks = t.saturating_duration_since(self.epoch).as_nanos().div_ceil(g);
        self.epoch + Duration::from_nanos((ticks * g).min(u64::MAX as u128) as u64)
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.inner().waiting.len()
    }
}

/// Ready at its deadline; forgets its deadline when dropped.
pub struct Sleep {
    deadlines: Arc<Deadlines>,
    deadline: Instant,
    key: Option<Key>,
}

impl Sleep {
    fn forget(&mut self) {
        if let Some(k) = self.key.take() {
            self.deadlines.inner().waiting.remove(&k);
        }
    }

    /// Move the deadline.
    pub fn reset(&mut self, deadline: Instant) {
        self.forget();
        self.deadline = deadline;
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            this.forget();
            return Poll::Ready(());
        }
        let mut inner = this.deadlines.inner();
        let key = match this.key {
            Some(k) => k,
            None => {
                inner.next_id += 1;
                let k = (this.deadline, inner.next_id);
                this.key = Some(k);
                k
            }
        };
        inner
            .waiting
            .entry(key)
            .and_modify(|w| w.clone_from(cx.waker()))
            .or_insert_with(|| cx.waker().clone());
        let rearm = inner.armed.is_none_or(|t| this.deadline < t);
        if rearm {
            // Until the task has re-armed, later deadlines need not wake it again.
            inner.armed = Some(this.deadline);
        }
        drop(inner);
        if rearm {
            this.deadlines.rearm.notify(1);
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.forget();
    }
}

impl hyper::rt::Sleep for Sleep {}

/// A [`Sleep`] on a grid, for deadlines that may come a little late: every agent link's next
/// ping or silence check. Rounded up to the same grid, those of thousands of links fall due
/// together, and the timer task wakes once per grid step instead of once per link.
pub struct Coarse {
    sleep: Sleep,
    grid: Duration,
}

impl Coarse {
    /// Move the deadline to `at`, rounded up to the grid.
    pub fn set_at(&mut self, at: Instant) {
        let t = self.sleep.deadlines.round_up(at, self.grid);
        self.sleep.reset(t);
    }
}

impl Future for Coarse {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.sleep).poll(cx)
    }
}

/// hyper's timer (header read timeouts) on [`Deadlines`].
#[derive(Clone)]
pub struct HyperTimer(pub Arc<Deadlines>);

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.sleep(duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.0.sleep_until(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Sleep>() {
            Some(s) => s.get_mut().reset(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `test` with deadlines whose task runs beside it.
    fn with_deadlines<F: Future<Output = ()>>(test: impl FnOnce(Arc<Deadlines>) -> F) {
        let d = Deadlines::new();
        let ex = smol::LocalExecutor::new();
        ex.spawn(d.clone().run()).detach();
        smol::block_on(ex.run(test(d)));
    }

    #[test]
    fn deadlines_fire_in_order_on_time_and_are_forgotten_when_dropped() {
        with_deadlines(|d| async move {
            let t0 = Instant::now();
            // A later deadline registered first, then an earlier one: the task must re-arm for it.
            let mut late = d.sleep(Duration::from_secs(1));
            assert!(smol::future::poll_once(&mut late).await.is_none());
            // Let the task arm its timer for the later one (it was woken first, so it runs first).
            smol::future::yield_now().await;
            let mut early = d.sleep(Duration::from_millis(100));
            assert!(smol::future::poll_once(&mut early).await.is_none());
            // One that is dropped before its time leaves nothing behind.
            let mut dropped = d.sleep(Duration::from_secs(60));
            assert!(smol::future::poll_once(&mut dropped).await.is_none());
            assert_eq!(d.waiting(), 3);
            drop(dropped);
            assert_eq!(d.waiting(), 2);

            early.await;
            let e = t0.elapsed();
            assert!(e >= Duration::from_millis(100), "fired early: {e:?}");
            assert!(e < Duration::from_secs(1), "the earlier deadline waited for the later one: {e:?}");
            late.await;
            let l = t0.elapsed();
            assert!(l >= Duration::from_secs(1), "fired early: {l:?}");
            assert_eq!(d.waiting(), 0, "deadlines left behind");
        });
    }

    #[test]
    fn a_reset_sleep_waits_for_its_new_deadline() {
        with_deadlines(|d| async move {
            let t0 = Instant::now();
            let mut s = d.sleep(Duration::from_secs(60));
            // Registered, then moved much earlier.
            assert!(smol::future::poll_once(&mut s).await.is_none());
            smol::future::yield_now().await; // the task arms its timer for 60 s
            s.reset(t0 + Duration::from_millis(50));
            s.await;
            let e = t0.elapsed();
            assert!(e >= Duration::from_millis(50) && e < Duration::from_secs(10), "{e:?}");
            assert_eq!(d.waiting(), 0);
        });
    }

    #[test]
    fn coarse_deadlines_round_up_to_one_grid_point_and_fire_together() {
        with_deadlines(|d| async move {
            let grid = Duration::from_millis(100);
            let base = d.round_up(Instant::now() + Duration::from_millis(150), grid);
            assert_eq!(d.round_up(base, grid), base, "a grid point stays where it is");
            assert_eq!(d.round_up(base + Duration::from_nanos(1), grid), base + grid);
            // Three deadlines within one grid step all fall due at its end, never before.
            let mut a = d.coarse_until(base + Duration::from_millis(10), grid);
            let mut b = d.coarse_until(base + Duration::from_millis(50), grid);
            let mut c = d.coarse_until(base + Duration::from_millis(90), grid);
            for s in [&mut a, &mut b, &mut c] {
                assert!(smol::future::poll_once(s).await.is_none());
            }
            assert_eq!(d.waiting(), 3);
            (&mut a).await;
            assert!(Instant::now() >= base + grid, "fired before its grid point");
            // The same instant: the other two are due too, with no further wait.
            assert!(smol::future::poll_once(&mut b).await.is_some());
            assert!(smol::future::poll_once(&mut c).await.is_some());
            // Moved: rounded up from the new deadline, and waited for.
            let t = Instant::now();
            a.set_at(t + Duration::from_millis(120));
            (&mut a).await;
            let e = t.elapsed();
            assert!(e >= Duration::from_millis(120) && e < Duration::from_secs(10), "{e:?}");
            assert_eq!(d.waiting(), 0);
        });
    }
}

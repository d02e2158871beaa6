//! A build the controller holds in memory while it is queued or running: its pipeline, its
//! cancel flag, the events that wake its runner, waiters and log followers, and why it stalls.

use super::pipeline::{Pipeline, Plan};
use super::store::{BuildRecord, StepRecord};
use event_listener::Event;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};

/// A build's record and steps as stored once it is over.
pub type FinalRecord = (BuildRecord, Vec<StepRecord>);

/// A queued or running build.
pub struct LiveBuild {
    /// Build number.
    pub id: u64,
    /// The parsed pipeline.
    pub pipeline: Pipeline,
    /// Its plan for this build's parameters.
    pub plan: Plan,
    /// Set by `wisp cancel`.
    pub cancelled: AtomicBool,
    /// How many times it was cancelled (post steps after a cancel run until the next one).
    pub cancels: AtomicU32,
    /// Fires on step changes, cancels, node changes, stalls and the end of the build (wakes the
    /// runner, waiters and followers).
    pub changed: Event,
    /// Fires on each piece of output stored (wakes log followers only: a waiter for the result has
    /// no business waking per output frame).
    pub output: Event,
    /// Steps finished so far, by number.
    done: Mutex<std::collections::BTreeSet<u32>>,
    /// Why a running build makes no progress (its log or the store cannot be written).
    stalled: Mutex<Option<String>>,
    /// Picked up from the store after a restart (not numbered in this run of the controller).
    recovered: AtomicBool,
    /// The final record and steps as stored, once the build is over (answers waiters without a
    /// store read).
    last: Mutex<Option<Arc<FinalRecord>>>,
    /// When it was queued (submitted, or picked up after a restart).
    pub queued_at: std::time::Instant,
}

impl LiveBuild {
    /// A build about to be queued or picked up.
    pub fn new(id: u64, pipeline: Pipeline, plan: Plan) -> Self {
        Self {
            id,
            pipeline,
            plan,
            cancelled: AtomicBool::new(false),
            cancels: AtomicU32::new(0),
            changed: Event::new(),
            output: Event::new(),
            done: Mutex::new(Default::default()),
            stalled: Mutex::new(None),
            recovered: AtomicBool::new(false),
            last: Mutex::new(None),
            queued_at: std::time::Instant::now(),
        }
    }

    /// Note step `n` finished (its end is stored).
    pub fn mark_done(&self, n: u32) {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).insert(n);
    }

    /// Whether step `n` finished while this build was live.
    pub fn is_done(&self, n: u32) -> bool {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).contains(&n)
    }

    /// Cancel it: running steps are stopped, queued units withdrawn, post steps for `aborted`
    /// run (a second cancel stops those too).
    pub fn cancel(&self) {
        self.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cancels.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify(usize::MAX);
    }

    /// Keep the final record and steps as stored, and wake waiters.
    pub fn set_final(&self, build: BuildRecord, steps: Vec<StepRecord>) {
        if build.state.is_final() {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new((build, steps)));
            self.changed.notify(usize::MAX);
        }
    }

    /// The final record and steps, once the build is over.
    pub fn final_record(&self) -> Option<Arc<FinalRecord>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Mark it as picked up from the store after a restart.
    pub fn mark_recovered(&self) {
        self.recovered.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether it was picked up from the store after a restart.
    pub fn recovered(&self) -> bool {
        self.recovered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Why the running build makes no progress, if it is stalled.
    pub fn stalled(&self) -> Option<String> {
        self.stalled.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Note (or clear) a stall; followers and waiters are woken when it changes.
    pub fn set_stalled(&self, why: Option<String>) {
        let mut s = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        if *s != why {
            *s = why;
            drop(s);
            self.changed.notify(usize::MAX);
        }
    }
}

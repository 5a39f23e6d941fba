//! Wall-clock time for the writer, behind a trait so tests can step it back.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Microseconds since the Unix epoch.
    fn now_micros(&self) -> i64;
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        chrono::Utc::now().timestamp_micros()
    }
}

/// The system clock plus an adjustable offset, to simulate clock steps in tests.
#[derive(Debug, Default)]
pub struct SteppableClock {
    offset_micros: AtomicI64,
}

impl SteppableClock {
    /// Moves the clock by `delta_micros` (negative steps it back).
    pub fn step(&self, delta_micros: i64) {
        self.offset_micros.fetch_add(delta_micros, Ordering::SeqCst);
    }
}

impl Clock for SteppableClock {
    fn now_micros(&self) -> i64 {
        SystemClock.now_micros() + self.offset_micros.load(Ordering::SeqCst)
    }
}

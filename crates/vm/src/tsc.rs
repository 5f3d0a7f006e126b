//! The host's TSC rate, which a guest under TCG needs to be told.
//!
//! Under TCG the guest reads the host's time-stamp counter. On a busy host the guest
//! kernel's early calibration against the emulated PIT fails ("Unable to calibrate
//! against PIT ... Marking TSC unstable") and boot stalls for good; given the rate with
//! `tsc_early_khz=` and `tsc=reliable` it skips that calibration.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Measurement window. Each end is read as a TSC value bracketing a clock reading, the
/// tightest of a few tries, so it is off by well under a microsecond unless the thread
/// is preempted in every try: 5 ms gives a rate within 0.01 %. It is spent once per
/// process, on a thread of its own ([`measure_in_background`]) while the caller prepares
/// the rest of a TCG start.
const WINDOW: Duration = Duration::from_millis(5);

/// Bracketing tries per end of the window.
const TRIES: usize = 8;

/// The host TSC rate in kHz, measured once per process.
pub fn host_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(measure)
}

/// Starts measuring the host TSC rate on a thread of its own, so that its window passes
/// while the caller prepares the rest of a TCG start; [`host_tsc_khz`] then waits only
/// for what is left of it.
pub fn measure_in_background() {
    std::thread::spawn(host_tsc_khz);
}

fn measure() -> u64 {
    let (start, ticks_start) = bracketed_reading();
    std::thread::sleep(WINDOW);
    let (end, ticks_end) = bracketed_reading();
    let nanos = end.duration_since(start).as_nanos().max(1);
    (u128::from(ticks_end.wrapping_sub(ticks_start)) * 1_000_000 / nanos) as u64
}

/// A clock reading and the TSC value at it: the midpoint of the two TSC reads around it,
/// from the try whose reads lie closest together.
fn bracketed_reading() -> (Instant, u64) {
    // SAFETY: RDTSC has no preconditions on x86_64.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    (0..TRIES)
        .map(|_| {
            let before = rdtsc();
            let now = Instant::now();
            let after = rdtsc();
            let spread = after.wrapping_sub(before);
            (spread, now, before.wrapping_add(spread / 2))
        })
        .min_by_key(|&(spread, _, _)| spread)
        .map(|(_, now, ticks)| (now, ticks))
        .expect("at least one try")
}

/// Kernel arguments that let a TCG guest trust the host's TSC.
pub fn tcg_kernel_args() -> [String; 2] {
    [
        format!("tsc_early_khz={}", host_tsc_khz()),
        "tsc=reliable".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_plausible_and_stable() {
        let khz = host_tsc_khz();
        // Any x86_64 host of the last two decades: 100 MHz .. 10 GHz.
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        let again = measure();
        let drift = khz.abs_diff(again) as f64 / khz as f64;
        assert!(drift < 0.001, "{khz} vs {again} kHz");
    }
}

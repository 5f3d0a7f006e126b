//! The host's TSC rate, which a guest under TCG needs to be told.
//!
//! Under TCG the guest reads the host's time-stamp counter. On a busy host the guest
//! kernel's early calibration against the emulated PIT fails ("Unable to calibrate
//! against PIT ... Marking TSC unstable") and boot stalls for good; given the rate with
//! `tsc_early_khz=` and `tsc=reliable` it skips that calibration.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Measurement window: long enough for a rate within 0.1 %, short beside a boot.
const WINDOW: Duration = Duration::from_millis(20);

/// The host TSC rate in kHz, measured once per process.
pub fn host_tsc_khz() -> u64 {
    static KHZ: OnceLock<u64> = OnceLock::new();
    *KHZ.get_or_init(measure)
}

fn measure() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (start, ticks_start) = (Instant::now(), rdtsc());
    std::thread::sleep(WINDOW);
    let (elapsed, ticks) = (start.elapsed(), rdtsc().wrapping_sub(ticks_start));
    (u128::from(ticks) * 1000 / elapsed.as_micros().max(1)) as u64
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
        assert!(drift < 0.05, "{khz} vs {again} kHz");
    }
}

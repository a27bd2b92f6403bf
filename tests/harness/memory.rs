//! Resident memory (`VmRSS` in `/proc/PID/status`): of the test process, where a
//! [`TestHost`](crate::TestHost) runs, or of a [`HostProcess`](crate::process::HostProcess),
//! which no other test shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;

/// Held by every test that bounds the process's memory, so that two of them never measure each
/// other.
pub static MEMORY_MEASUREMENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's resident memory (`VmRSS` in `/proc/self/status`), in bytes: the host runs
/// in the test process, so this is what it holds (with the test's own clients).
pub fn resident_bytes() -> anyhow::Result<u64> {
    resident_bytes_of("/proc/self/status")
}

/// `VmRSS` in the status file `status`, in bytes.
fn resident_bytes_of(status: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(status)?;
    let kib: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no VmRSS in {status}"))?
        .parse()?;
    Ok(kib * 1024)
}

/// Samples a process's resident memory every few milliseconds on a thread of its own until
/// stopped: the peak shows what a test made the process hold, even for a moment.
pub struct ResidentPeak {
    baseline: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl ResidentPeak {
    /// Interval between samples.
    const EVERY: Duration = Duration::from_millis(2);

    /// Starts sampling the test process; the baseline is its memory now.
    pub fn start() -> anyhow::Result<Self> {
        Self::sampling("/proc/self/status".to_owned())
    }

    /// Starts sampling the process `pid`; the baseline is its memory now.
    pub fn of_process(pid: u32) -> anyhow::Result<Self> {
        Self::sampling(format!("/proc/{pid}/status"))
    }

    fn sampling(status: String) -> anyhow::Result<Self> {
        let baseline = resident_bytes_of(&status)?;
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = std::thread::spawn({
            let peak = peak.clone();
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(now) = resident_bytes_of(&status) {
                        peak.fetch_max(now, Ordering::Relaxed);
                    }
                    std::thread::sleep(Self::EVERY);
                }
            }
        });
        Ok(Self {
            baseline,
            peak,
            stop,
            sampler: Some(sampler),
        })
    }

    /// Stops sampling: how far above the baseline the memory went, in bytes.
    pub fn growth(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
        self.peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline)
    }
}

impl Drop for ResidentPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

//! Section 7: start-up, spawn until `/readyz` answers, with a cold and a warm compile cache,
//! for 1 and 100 plugins.

use super::bench::Bench;
use super::harness::{HostSetup, Switchyard};
use super::table::{Table, median, range_ms};

impl Bench {
    /// Section 7.
    pub(super) async fn start_up(&self) -> anyhow::Result<()> {
        let rounds = self.scale.startup_rounds;
        println!(
            "\n## 7. Start-up: spawn until /readyz answers 200; cold = empty compile_cache \
             folder, warm = second start on the same folder; median of {rounds}"
        );
        let mut table = Table::new(&[
            "plugins",
            "cold ms",
            "cold range",
            "warm ms",
            "warm range",
            "cold/warm",
        ]);
        for count in [1usize, 100] {
            let dir = self.forwards(count, true)?;
            let mut cold = Vec::new();
            let mut warm = Vec::new();
            for _ in 0..rounds {
                let cache = self.folder("startup-cache")?;
                let setup = HostSetup {
                    plugins: &dir,
                    compile_cache: Some(&cache),
                    extra: "",
                };
                for times in [&mut cold, &mut warm] {
                    let mut host = Switchyard::spawn(self.url(), &setup)?;
                    let ready = host.wait_ready().await;
                    host.stop().await;
                    times.push(ready?.as_secs_f64() * 1e3);
                }
            }
            table.row(vec![
                count.to_string(),
                format!("{:.0}", median(&cold)),
                range_ms(&cold),
                format!("{:.0}", median(&warm)),
                range_ms(&warm),
                format!("{:.1}", median(&cold) / median(&warm)),
            ]);
        }
        table.print();
        println!(
            "   the 100 copies are byte-different (a custom section each), so each is compiled \
             and cached on its own, as 100 different plugins would be"
        );
        Ok(())
    }
}

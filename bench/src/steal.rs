//! CPU time the hypervisor took from this VM while a row ran (`steal` in `/proc/stat`): how the
//! bench tells a row the host disturbed from a slow one.
//!
//! On the 2-core VMs the bench has run on, rounds in which pass-through itself fell to a third
//! of its usual rate had ~6% of the CPUs' time stolen; undisturbed rounds ~0.2%. Every row
//! records the largest share stolen from any one CPU (Envoy has CPU 0, everything else CPU 1,
//! so either one slows the row), and the summary gives medians over the rounds neither a row
//! nor its baseline was disturbed in, beside the medians over all rounds.

/// A row during which the hypervisor took more than this share of any one CPU's time (percent)
/// counts as disturbed.
pub const DISTURBED_PERCENT: f64 = 2.0;

/// Per CPU: stolen ticks and all ticks so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot(Vec<(u64, u64)>);

impl Snapshot {
    /// Now, from `/proc/stat`; `None` where there is none (not Linux).
    pub fn take() -> Option<Snapshot> {
        parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The largest share of one CPU's time stolen between `self` and `later`, in percent.
    pub fn stolen_percent_until(&self, later: &Snapshot) -> Option<f64> {
        self.0
            .iter()
            .zip(&later.0)
            .filter_map(|(&(steal_before, all_before), &(steal_after, all_after))| {
                let all = all_after.checked_sub(all_before).filter(|&all| all > 0)?;
                let stolen = steal_after.saturating_sub(steal_before);
                Some(stolen as f64 * 100.0 / all as f64)
            })
            .max_by(f64::total_cmp)
    }
}

/// Whether a row that had `stolen` percent taken counts as disturbed (unknown: not disturbed).
pub fn disturbed(stolen: Option<f64>) -> bool {
    stolen.is_some_and(|percent| percent > DISTURBED_PERCENT)
}

/// The `cpuN` lines of `/proc/stat`: user nice system idle iowait irq softirq steal … (guest
/// time is already inside user and nice, so it is not added again).
fn parse(stat: &str) -> Option<Snapshot> {
    let cpus: Vec<(u64, u64)> = stat
        .lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .filter_map(|line| {
            let ticks: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let steal = *ticks.get(7)?;
            Some((steal, ticks.iter().sum()))
        })
        .collect();
    (!cpus.is_empty()).then_some(Snapshot(cpus))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  300 0 30 600 5 0 3 12 0 0\n\
                          cpu0 100 0 10 300 2 0 1 2 0 0\n\
                          cpu1 200 0 20 300 3 0 2 10 0 0\n\
                          intr 12345\n";
    const AFTER: &str = "cpu  500 0 50 880 5 0 3 62 0 0\n\
                         cpu0 200 0 20 390 2 0 1 2 0 0\n\
                         cpu1 300 0 30 390 3 0 2 60 0 0\n";

    #[test]
    fn the_most_stolen_cpu_decides_and_the_total_line_is_ignored() {
        let (before, after) = (parse(BEFORE).unwrap(), parse(AFTER).unwrap());
        assert_eq!(before.0, vec![(2, 415), (10, 535)]);
        // cpu0: nothing stolen of 200 ticks; cpu1: 50 of 250.
        let stolen = before.stolen_percent_until(&after).unwrap();
        assert!((stolen - 20.0).abs() < 1e-9, "{stolen}");
        assert!(disturbed(Some(stolen)));
    }

    #[test]
    fn an_undisturbed_row_and_an_unreadable_stat() {
        let before = parse(BEFORE).unwrap();
        assert_eq!(before.stolen_percent_until(&before), None, "no time passed");
        assert!(!disturbed(Some(1.5)));
        assert!(!disturbed(None));
        assert_eq!(parse("intr 1\nctxt 2\n"), None);
        assert_eq!(parse("cpu0 1 2 three 4 5 6 7 8\n"), None);
    }
}

//! Blink patterns: one fixed-size pattern per agent condition.
//!
//! [`PATTERNS`] is the only table: the LED task plays it, [`to_svg`] draws it,
//! and `tests/panel.rs` checks `hw/led-patterns.svg` and the table in
//! `hw/README.md` against it.

use std::fmt::Write;

use crate::panel::Condition;

/// Maximum number of phases in one pattern.
pub const MAX_PHASES: usize = 8;

/// One phase of a pattern: the LED on or off for a number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Phase {
    pub on: bool,
    pub ms: u16,
}

const fn on(ms: u16) -> Phase {
    Phase { on: true, ms }
}

const fn off(ms: u16) -> Phase {
    Phase { on: false, ms }
}

/// One row of the pattern table.
#[derive(Debug, Clone, Copy)]
pub struct PatternSpec {
    pub condition: Condition,
    /// Phases played in a loop. A single phase keeps the LED steady.
    pub phases: &'static [Phase],
    /// Description of the blinking for a technician.
    pub looks_like: &'static str,
}

/// The blink pattern of every condition, in priority order: when several
/// conditions hold, the LED plays the first of them in this table.
pub const PATTERNS: [PatternSpec; 11] = [
    PatternSpec { condition: Condition::ResetRunning, phases: &[on(50), off(50), on(50), off(850)], looks_like: "double flash every second" },
    PatternSpec { condition: Condition::ResetArmed, phases: &[on(50), off(50)], looks_like: "rapid flicker" },
    PatternSpec {
        condition: Condition::NeedsAttention,
        phases: &[on(200), off(200), on(200), off(200), on(200), off(1400)],
        looks_like: "three blinks, pause",
    },
    PatternSpec {
        condition: Condition::NoSpace,
        phases: &[on(200), off(200), on(200), off(200), on(200), off(200), on(200), off(1400)],
        looks_like: "four blinks, pause",
    },
    PatternSpec { condition: Condition::WaitingForDocker, phases: &[on(1500), off(500)], looks_like: "long on, short off" },
    PatternSpec { condition: Condition::Applying, phases: &[on(150), off(150)], looks_like: "fast blink" },
    PatternSpec { condition: Condition::Downloading, phases: &[on(500), off(500)], looks_like: "slow blink, once a second" },
    PatternSpec { condition: Condition::Checking, phases: &[on(500), off(500)], looks_like: "slow blink, once a second" },
    PatternSpec { condition: Condition::RolledBack, phases: &[on(200), off(200), on(200), off(1400)], looks_like: "two blinks, pause" },
    PatternSpec { condition: Condition::Starting, phases: &[on(1000)], looks_like: "steady on" },
    PatternSpec { condition: Condition::Healthy, phases: &[on(100), off(2900)], looks_like: "short blip every 3 seconds" },
];

/// A blink pattern, played in a loop. It has a fixed capacity, so playing it
/// never allocates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    phases: heapless::Vec<Phase, MAX_PHASES>,
}

impl Pattern {
    /// Returns the pattern of `condition` from [`PATTERNS`].
    pub fn of(condition: Condition) -> Pattern {
        let spec = spec(condition);
        let mut phases = heapless::Vec::new();
        for phase in spec.phases {
            // The test `every_pattern_fits` checks that no row of the table
            // has more than MAX_PHASES phases.
            phases.push(*phase).expect("every pattern in PATTERNS fits MAX_PHASES");
        }
        Pattern { phases }
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// Tells whether the LED stays on or off without blinking.
    pub fn is_steady(&self) -> bool {
        self.phases.len() == 1
    }

    /// Returns the length of one loop in milliseconds.
    pub fn period_ms(&self) -> u32 {
        self.phases.iter().map(|phase| u32::from(phase.ms)).sum()
    }
}

/// Returns the table row of `condition`.
pub fn spec(condition: Condition) -> &'static PatternSpec {
    PATTERNS.iter().find(|spec| spec.condition == condition).expect("the test `table_covers_every_condition` checks that PATTERNS has a row for each condition")
}

/// Width of one second in the picture, in pixels.
const PIXELS_PER_SECOND: u32 = 100;
/// Seconds of each pattern the picture shows.
const PICTURE_SECONDS: u32 = 6;

/// Draws [`PATTERNS`] as an SVG picture: one row per condition, in priority
/// order, showing the first six seconds of its pattern.
pub fn to_svg() -> String {
    let label_width = 420;
    let row_height = 40;
    let top = 50;
    let width = label_width + PICTURE_SECONDS * PIXELS_PER_SECOND + 20;
    let height = top + row_height * PATTERNS.len() as u32 + 20;
    let mut svg = String::new();

    // Writing into a String cannot fail, so the fmt::Result values are dropped.
    // XML forbids "--" inside a comment, so the command with `--test` is not
    // quoted here; tests/panel.rs checks the comment.
    let _ = writeln!(
        svg,
        "<!-- Generated from the blink pattern table by the pattern_picture_matches_table test of tests/panel.rs, run with UPDATE_PATTERNS=1 -->"
    );
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="Helvetica, Arial, sans-serif" font-size="14">"#
    );
    let _ = writeln!(svg, r#"  <rect width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(svg, r#"  <text x="10" y="20" font-weight="bold">Status LED: the first condition that holds, from the top, sets the pattern</text>"#);
    for second in 0..=PICTURE_SECONDS {
        let x = label_width + second * PIXELS_PER_SECOND;
        let _ = writeln!(svg, r#"  <line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="silver"/>"#, top - 8, height - 20);
        let _ = writeln!(svg, r#"  <text x="{x}" y="{}" text-anchor="middle" font-size="11">{second} s</text>"#, top - 12);
    }

    for (index, row) in PATTERNS.iter().enumerate() {
        let y = top + row_height * index as u32;
        let _ = writeln!(svg, r#"  <text x="10" y="{}">{}. {}: {}</text>"#, y + 22, index + 1, row.condition.name(), row.looks_like);
        let _ = writeln!(svg, r#"  <rect x="{label_width}" y="{}" width="{}" height="20" fill="dimgray"/>"#, y + 8, PICTURE_SECONDS * PIXELS_PER_SECOND);
        let end_ms = PICTURE_SECONDS * 1000;
        let mut at_ms = 0u32;
        'row: loop {
            for phase in row.phases {
                let length = u32::from(phase.ms).min(end_ms - at_ms);
                if phase.on {
                    let x = label_width + at_ms * PIXELS_PER_SECOND / 1000;
                    let pixels = (length * PIXELS_PER_SECOND / 1000).max(1);
                    let _ = writeln!(svg, r#"  <rect x="{x}" y="{}" width="{pixels}" height="20" fill="gold"/>"#, y + 8);
                }
                at_ms += length;
                if at_ms >= end_ms {
                    break 'row;
                }
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_every_condition() {
        for condition in Condition::ALL {
            let rows = PATTERNS.iter().filter(|spec| spec.condition == condition).count();
            assert_eq!(rows, 1, "{condition:?} has exactly one row");
        }
    }

    #[test]
    fn table_is_in_priority_order() {
        let conditions: Vec<Condition> = PATTERNS.iter().map(|spec| spec.condition).collect();
        let mut sorted = conditions.clone();
        sorted.sort();
        assert_eq!(conditions, sorted, "PATTERNS lists conditions from the highest priority to the lowest");
    }

    #[test]
    fn every_pattern_fits() {
        for spec in PATTERNS {
            assert!(spec.phases.len() <= MAX_PHASES, "{:?}", spec.condition);
            assert!(!spec.phases.is_empty(), "{:?}", spec.condition);
            assert!(spec.phases.iter().all(|phase| phase.ms > 0), "{:?} has a zero-length phase", spec.condition);
        }
    }

    #[test]
    fn blinking_patterns_alternate() {
        for spec in PATTERNS.iter().filter(|spec| spec.phases.len() > 1) {
            assert_eq!(spec.phases.len() % 2, 0, "{:?} ends where it starts", spec.condition);
            for pair in spec.phases.windows(2) {
                assert_ne!(pair[0].on, pair[1].on, "{:?} repeats a level", spec.condition);
            }
        }
    }

    #[test]
    fn patterns_tell_conditions_apart() {
        for (index, first) in PATTERNS.iter().enumerate() {
            for second in &PATTERNS[index + 1..] {
                let shared = matches!((first.condition, second.condition), (Condition::Downloading, Condition::Checking));
                if !shared {
                    assert_ne!(first.phases, second.phases, "{:?} and {:?}", first.condition, second.condition);
                }
            }
        }
    }

    #[test]
    fn svg_has_one_row_per_condition() {
        let svg = to_svg();
        for (index, spec) in PATTERNS.iter().enumerate() {
            assert!(svg.contains(&format!("{}. {}: {}", index + 1, spec.condition.name(), spec.looks_like)), "{:?}", spec.condition);
        }
    }
}

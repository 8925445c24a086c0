//! Feeds TOML text to the agent's and the host patch's configuration
//! parsers. A parse may fail with problems but must not panic, and a problem
//! that names a line must name one inside the text.

#![no_main]

use eventpi_autoupdate::config::{Config, HostPatchConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count().max(1);

    if let Err(problems) = Config::parse(text) {
        check_problems(&problems, lines);
    }
    if let Err(problems) = HostPatchConfig::parse(text) {
        check_problems(&problems, lines);
    }
});

fn check_problems(problems: &[eventpi_autoupdate::config::Problem], lines: usize) {
    assert!(!problems.is_empty(), "a failed parse reports at least one problem");
    for problem in problems {
        let text = problem.to_string();
        assert!(!text.is_empty(), "a problem has a message");
        if let Some(line) = problem.line {
            assert!(line >= 1, "problem on line 0: {text}");
            assert!(line <= lines + 1, "problem on line {line} of a {lines}-line text: {text}");
        }
    }
}

//! The DOT files in `state-diagrams/` match the machines' transition lists.
//! Run with `UPDATE_DIAGRAMS=1` to rewrite them after changing a machine.

use std::path::PathBuf;

use eventpi_autoupdate::diagram::to_dot;
use eventpi_autoupdate::machine::TABLES;

#[test]
fn diagrams_match_transition_lists() {
    let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("state-diagrams");
    let update = std::env::var_os("UPDATE_DIAGRAMS").is_some();
    let mut stale = Vec::new();

    for table in TABLES {
        let path = directory.join(format!("{}.dot", table.machine.name()));
        let expected = to_dot(table);
        if update {
            std::fs::create_dir_all(&directory).unwrap();
            std::fs::write(&path, &expected).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != expected {
            stale.push(path.display().to_string());
        }
    }

    assert!(stale.is_empty(), "out of date: {stale:?}; regenerate with UPDATE_DIAGRAMS=1 cargo test --test diagrams");
}

#[test]
fn every_transition_appears_in_diagram() {
    for table in TABLES {
        let dot = to_dot(table);
        let edges = dot.lines().filter(|line| line.contains("->") && line.contains("label=")).count();
        assert_eq!(edges, table.transitions.len(), "{} has one edge per transition", table.machine.name());
    }
}

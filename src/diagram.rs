//! DOT diagrams of the machines, generated from their transition tables.
//!
//! The output depends only on the table, never on the graphviz version, so
//! the committed `.dot` files can be compared in CI.

use std::fmt::Write;

use crate::machine::MachineTable;

/// Renders one machine as a DOT digraph, in the order of its transition list.
pub fn to_dot(table: &MachineTable) -> String {
    let name = table.machine.name();
    let mut dot = String::new();
    let state = |code: u8| table.state_name(code).unwrap_or("?");
    let event = |code: u8| table.event_name(code).unwrap_or("?");

    // Writing into a String cannot fail, so the fmt::Result values are dropped.
    let _ = writeln!(dot, "// Generated from the {name} machine's transition list; do not edit.");
    let _ = writeln!(dot, "// Regenerate with: UPDATE_DIAGRAMS=1 cargo test --test diagrams");
    let _ = writeln!(dot, "digraph \"{name}\" {{");
    let _ = writeln!(dot, "  rankdir=LR;");
    let _ = writeln!(dot, "  node [shape=box, style=rounded, fontname=\"Helvetica\"];");
    let _ = writeln!(dot, "  edge [fontname=\"Helvetica\", fontsize=10];");
    let _ = writeln!(dot, "  start [shape=point];");
    let _ = writeln!(dot, "  start -> \"{}\";", state(table.start));
    for info in table.states {
        let _ = writeln!(dot, "  \"{}\";", info.name);
    }
    for row in table.transitions {
        let mut label = event(row.event).to_string();
        if let Some(guard) = row.guard {
            let _ = write!(label, " [{guard}]");
        }
        if let Some(action) = row.action {
            let _ = write!(label, " / {action}");
        }
        let _ = writeln!(dot, "  \"{}\" -> \"{}\" [label=\"{}\"];", state(row.from), state(row.to), label.replace('"', "\\\""));
    }
    dot.push_str("}\n");
    dot
}

//! Pure state machines and the tables generated from their transition lists.
//!
//! Each machine is written once with [`define_machine!`], which expands to the
//! `smlang` machine, explicit persisted codes for its states and events, and a
//! constant [`MachineTable`]. The table feeds the DOT diagrams and the tests
//! that need one case per state. No machine does I/O: guards read facts given
//! to them, and actions queue commands for a driver.

pub mod factory;
pub mod host;
pub mod selfupdate;
pub mod space;
pub mod stack;

use std::fmt;

/// The update processes of the agent. The codes are persisted in the journal
/// and never change meaning.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MachineKind {
    Stack = 1,
    SelfUpdate = 2,
    HostPatch = 3,
    SpaceGuard = 4,
    FactoryReset = 5,
}

impl MachineKind {
    pub const ALL: [MachineKind; 5] = [MachineKind::Stack, MachineKind::SelfUpdate, MachineKind::HostPatch, MachineKind::SpaceGuard, MachineKind::FactoryReset];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.code() == code)
    }

    /// Returns the name used in logs, failpoints and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            MachineKind::Stack => "stack",
            MachineKind::SelfUpdate => "self-update",
            MachineKind::HostPatch => "host-patch",
            MachineKind::SpaceGuard => "space-guard",
            MachineKind::FactoryReset => "factory-reset",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Returns the transition table of a machine that this build contains.
    pub fn table(self) -> Option<&'static MachineTable> {
        TABLES.iter().copied().find(|table| table.machine == self)
    }
}

impl fmt::Display for MachineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every machine table this build contains.
pub const TABLES: &[&MachineTable] =
    &[&stack::STACK_TABLE, &host::HOST_TABLE, &space::SPACE_TABLE, &selfupdate::SELF_UPDATE_TABLE, &factory::FACTORY_RESET_TABLE];

/// A state of a machine with its persisted code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateInfo {
    pub code: u8,
    pub name: &'static str,
}

/// An event of a machine with its persisted code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInfo {
    pub code: u8,
    pub name: &'static str,
}

/// One line of a transition list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransitionRow {
    pub from: u8,
    pub event: u8,
    /// The guard expression as written, for example `!can_resume`.
    pub guard: Option<&'static str>,
    pub action: Option<&'static str>,
    pub to: u8,
}

/// The whole transition list of one machine, as constant data.
#[derive(Debug)]
pub struct MachineTable {
    pub machine: MachineKind,
    pub start: u8,
    pub states: &'static [StateInfo],
    pub events: &'static [EventInfo],
    pub transitions: &'static [TransitionRow],
}

impl MachineTable {
    pub fn state_name(&self, code: u8) -> Option<&'static str> {
        self.states.iter().find(|state| state.code == code).map(|state| state.name)
    }

    pub fn event_name(&self, code: u8) -> Option<&'static str> {
        self.events.iter().find(|event| event.code == code).map(|event| event.name)
    }

    pub fn state_code(&self, name: &str) -> Option<u8> {
        self.states.iter().find(|state| state.name == name).map(|state| state.code)
    }

    /// Returns the transitions that leave `state`, in list order.
    pub fn transitions_from(&self, state: u8) -> impl Iterator<Item = &'static TransitionRow> + '_ {
        self.transitions.iter().filter(move |row| row.from == state)
    }

    /// Tells whether some transition of `state` takes `event`.
    pub fn handles(&self, state: u8, event: u8) -> bool {
        self.transitions_from(state).any(|row| row.event == event)
    }
}

/// Formats a state code of any machine, also one from a newer version.
pub fn describe_state(machine: u8, code: u8) -> String {
    MachineKind::from_code(machine)
        .and_then(MachineKind::table)
        .and_then(|table| table.state_name(code))
        .map_or_else(|| format!("state#{code}"), str::to_string)
}

/// Formats an event code of any machine, also one from a newer version.
pub fn describe_event(machine: u8, code: u8) -> String {
    MachineKind::from_code(machine)
        .and_then(MachineKind::table)
        .and_then(|table| table.event_name(code))
        .map_or_else(|| format!("event#{code}"), str::to_string)
}

/// Formats a machine code, also one from a newer version.
pub fn describe_machine(code: u8) -> String {
    MachineKind::from_code(code).map_or_else(|| format!("machine#{code}"), |kind| kind.name().to_string())
}

#[doc(hidden)]
#[macro_export]
macro_rules! __optional_text {
    () => {
        None
    };
    ($($tokens:tt)+) => {
        Some(stringify!($($tokens)+))
    };
}

/// Defines a machine from one transition list.
///
/// The first transition's source state is the start state. Beside the smlang
/// machine it generates `$state_enum` and `$event_enum` with explicit codes
/// (persisted in the journal, so never renumber them), conversions from the
/// smlang types, and the constant table `$table`. A state or event missing
/// from either list is a compile error, because the generated `match`es are
/// then not exhaustive or name a variant that does not exist.
#[macro_export]
macro_rules! define_machine {
    (
        machine: $kind:expr,
        smlang: $name:ident, $smlang_states:ident, $smlang_events:ident,
        states: $state_enum:ident { $($state:ident = $state_code:literal),+ $(,)? },
        events: $event_enum:ident { $($event:ident = $event_code:literal),+ $(,)? },
        table: $table:ident,
        transitions: { $first:ident $($rest:tt)* }
    ) => {
        smlang::statemachine! {
            name: $name,
            derive_states: [Debug, Clone, Copy],
            derive_events: [Debug, Clone],
            transitions: { *$first $($rest)* }
        }

        /// Persisted state codes of this machine.
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $state_enum {
            $($state = $state_code),+
        }

        impl $state_enum {
            pub const ALL: &'static [$state_enum] = &[$($state_enum::$state),+];

            pub fn code(self) -> u8 {
                self as u8
            }

            pub fn from_code(code: u8) -> Option<Self> {
                Self::ALL.iter().copied().find(|state| state.code() == code)
            }

            pub fn name(self) -> &'static str {
                match self {
                    $($state_enum::$state => stringify!($state)),+
                }
            }
        }

        impl From<&$smlang_states> for $state_enum {
            fn from(state: &$smlang_states) -> Self {
                match state {
                    $($smlang_states::$state => $state_enum::$state),+
                }
            }
        }

        impl From<$state_enum> for $smlang_states {
            fn from(state: $state_enum) -> Self {
                match state {
                    $($state_enum::$state => $smlang_states::$state),+
                }
            }
        }

        /// Persisted event codes of this machine.
        #[repr(u8)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $event_enum {
            $($event = $event_code),+
        }

        impl $event_enum {
            pub const ALL: &'static [$event_enum] = &[$($event_enum::$event),+];

            pub fn code(self) -> u8 {
                self as u8
            }

            pub fn name(self) -> &'static str {
                match self {
                    $($event_enum::$event => stringify!($event)),+
                }
            }
        }

        impl From<&$smlang_events> for $event_enum {
            fn from(event: &$smlang_events) -> Self {
                match event {
                    $($smlang_events::$event { .. } => $event_enum::$event),+
                }
            }
        }

        /// The transition list of this machine as constant data.
        pub const $table: $crate::machine::MachineTable = $crate::machine::MachineTable {
            machine: $kind,
            start: $state_enum::$first as u8,
            states: &[$($crate::machine::StateInfo { code: $state_code, name: stringify!($state) }),+],
            events: &[$($crate::machine::EventInfo { code: $event_code, name: stringify!($event) }),+],
            transitions: $crate::define_machine!(@rows $state_enum, $event_enum, { $first $($rest)* }),
        };
    };

    (@rows $state_enum:ident, $event_enum:ident, {
        $(
            $from:ident + $event:ident $(($event_data:ty))? $([$($guard:tt)+])? $(/ $action:ident)? = $to:ident
        ),+ $(,)?
    }) => {
        &[$(
            $crate::machine::TransitionRow {
                from: $state_enum::$from as u8,
                event: $event_enum::$event as u8,
                guard: $crate::__optional_text!($($($guard)+)?),
                action: $crate::__optional_text!($($action)?),
                to: $state_enum::$to as u8,
            }
        ),+]
    };
}

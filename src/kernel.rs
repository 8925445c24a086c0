//! Linux kernel release strings (`uname -r`): their flavour and their order.
//!
//! A Raspberry Pi OS image carries one kernel per board family, for example
//! `6.6.51+rpt-rpi-v8` (Pi 3 and 4) beside `6.6.51+rpt-rpi-2712` (Pi 5), and
//! Debian names its kernels like `6.1.0-28-arm64` or `6.1.0-28-rt-arm64`. The
//! boot loader only ever picks a kernel of the board's own flavour, so "the
//! newest installed kernel" is only meaningful within one flavour.

use std::cmp::Ordering;

/// Returns the flavour of a kernel release: the `-` separated parts after the
/// version, without the numeric ABI parts that Debian puts first.
///
/// `6.6.51+rpt-rpi-v8` → `rpi-v8`, `6.1.0-28-rt-arm64` → `rt-arm64`,
/// `6.1.21-v8+` → `v8+`, `6.1.21+` → `` (no flavour).
pub fn flavour(release: &str) -> &str {
    let Some((_, rest)) = release.trim().split_once('-') else { return "" };
    let mut rest = rest;
    while let Some((part, tail)) = rest.split_once('-') {
        if !part.chars().all(|character| character.is_ascii_digit()) {
            break;
        }
        rest = tail;
    }
    if rest.chars().all(|character| character.is_ascii_digit()) { "" } else { rest }
}

/// Returns the version part of a kernel release: everything before its
/// flavour, for example `6.1.0-28` for `6.1.0-28-arm64`.
pub fn version(release: &str) -> &str {
    let release = release.trim();
    let flavour = flavour(release);
    if flavour.is_empty() {
        return release;
    }
    release[..release.len() - flavour.len()].trim_end_matches('-')
}

/// Compares two kernel releases by their version with dpkg's ordering rules
/// (digits compare as numbers, `~` sorts before everything, letters before
/// other characters).
pub fn compare(left: &str, right: &str) -> Ordering {
    compare_versions(version(left), version(right))
}

/// Returns the newest release in `installed` that has the flavour of
/// `running`, or `None` when no installed release has that flavour.
pub fn newest_of_flavour<'a>(running: &str, installed: &'a [String]) -> Option<&'a str> {
    let running_flavour = flavour(running);
    installed
        .iter()
        .map(|release| release.trim())
        .filter(|release| !release.is_empty() && flavour(release) == running_flavour)
        .max_by(|left, right| compare(left, right))
}

/// Compares version strings as `dpkg --compare-versions` compares the
/// upstream part of a Debian version.
fn compare_versions(left: &str, right: &str) -> Ordering {
    let mut left = left.as_bytes();
    let mut right = right.as_bytes();
    while !left.is_empty() || !right.is_empty() {
        let left_text = take_while(&mut left, |byte| !byte.is_ascii_digit());
        let right_text = take_while(&mut right, |byte| !byte.is_ascii_digit());
        let text_order = compare_text(left_text, right_text);
        if text_order != Ordering::Equal {
            return text_order;
        }

        let left_number = take_while(&mut left, |byte| byte.is_ascii_digit());
        let right_number = take_while(&mut right, |byte| byte.is_ascii_digit());
        let number_order = compare_numbers(left_number, right_number);
        if number_order != Ordering::Equal {
            return number_order;
        }
    }
    Ordering::Equal
}

fn take_while<'a>(bytes: &mut &'a [u8], keep: impl Fn(u8) -> bool) -> &'a [u8] {
    let end = bytes.iter().position(|&byte| !keep(byte)).unwrap_or(bytes.len());
    let (taken, rest) = bytes.split_at(end);
    *bytes = rest;
    taken
}

/// Weight of one character in dpkg's order: `~` first, then the end of the
/// string, then letters, then everything else.
fn weight(byte: Option<u8>) -> i32 {
    match byte {
        Some(b'~') => -1,
        None => 0,
        Some(byte) if byte.is_ascii_alphabetic() => i32::from(byte),
        Some(byte) => i32::from(byte) + 256,
    }
}

fn compare_text(left: &[u8], right: &[u8]) -> Ordering {
    let length = left.len().max(right.len());
    for index in 0..length {
        let order = weight(left.get(index).copied()).cmp(&weight(right.get(index).copied()));
        if order != Ordering::Equal {
            return order;
        }
    }
    Ordering::Equal
}

fn compare_numbers(left: &[u8], right: &[u8]) -> Ordering {
    let left = trim_zeros(left);
    let right = trim_zeros(right);
    left.len().cmp(&right.len()).then_with(|| left.cmp(right))
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let start = digits.iter().position(|&digit| digit != b'0').unwrap_or(digits.len());
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_of_pi_and_debian_kernels() {
        assert_eq!(flavour("6.6.51+rpt-rpi-v8"), "rpi-v8");
        assert_eq!(flavour("6.6.51+rpt-rpi-2712"), "rpi-2712");
        assert_eq!(flavour("6.1.0-28-arm64"), "arm64");
        assert_eq!(flavour("6.1.0-28-rt-arm64"), "rt-arm64");
        assert_eq!(flavour("6.1.21-v8+"), "v8+");
        assert_eq!(flavour("6.1.21+"), "");
        assert_eq!(flavour("6.1.0-28"), "");
    }

    #[test]
    fn version_drops_flavour() {
        assert_eq!(version("6.1.0-28-arm64"), "6.1.0-28");
        assert_eq!(version("6.6.51+rpt-rpi-v8"), "6.6.51+rpt");
        assert_eq!(version("6.1.21+"), "6.1.21+");
    }

    #[test]
    fn numbers_compare_as_numbers() {
        assert_eq!(compare("6.6.9+rpt-rpi-v8", "6.6.51+rpt-rpi-v8"), Ordering::Less);
        assert_eq!(compare("6.1.0-28-arm64", "6.1.0-9-arm64"), Ordering::Greater);
        assert_eq!(compare("6.12.1-v8+", "6.6.74-v8+"), Ordering::Greater);
        assert_eq!(compare("6.6.51+rpt-rpi-v8", "6.6.51+rpt-rpi-v8"), Ordering::Equal);
    }

    #[test]
    fn tilde_sorts_before_release() {
        assert_eq!(compare_versions("6.1~rc1", "6.1"), Ordering::Less);
    }

    #[test]
    fn newest_stays_within_flavour() {
        let installed: Vec<String> = ["6.6.31+rpt-rpi-v8", "6.6.51+rpt-rpi-v8", "6.6.62+rpt-rpi-2712"].map(String::from).to_vec();

        assert_eq!(newest_of_flavour("6.6.31+rpt-rpi-v8", &installed), Some("6.6.51+rpt-rpi-v8"));
        assert_eq!(newest_of_flavour("6.6.51+rpt-rpi-2712", &installed), Some("6.6.62+rpt-rpi-2712"));
        assert_eq!(newest_of_flavour("6.1.0-28-arm64", &installed), None);
    }
}

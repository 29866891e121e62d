//! Output helpers: human tables by default, `--output json` for scripts.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (stable field names).
    Json,
}

/// RFC 3339 UTC time, or "" for 0 (never).
pub fn format_time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return String::new();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Times for people: local time with its UTC offset, or UTC with `--utc`.
static UTC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn use_utc(on: bool) {
    UTC.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `2026-12-01 09:14:03 +01:00` (local, zone shown), `2026-12-01 08:14:03 UTC` with `--utc`;
/// "" for 0 (never).
pub fn human_time(unix_ms: i64) -> String {
    human_time_in(unix_ms, UTC.load(std::sync::atomic::Ordering::Relaxed))
}

fn human_time_in(unix_ms: i64, utc: bool) -> String {
    use chrono::TimeZone as _;
    if unix_ms <= 0 {
        return String::new();
    }
    let Some(t) = chrono::Utc.timestamp_millis_opt(unix_ms).single() else {
        return String::new();
    };
    if utc {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    } else {
        t.with_timezone(&chrono::Local)
            .format("%Y-%m-%d %H:%M:%S %:z")
            .to_string()
    }
}

/// `HH:MM:SS` of an event, in the same zone as `human_time`.
pub fn clock(unix_ms: i64) -> String {
    human_time(unix_ms)
        .get(11..19)
        .unwrap_or_default()
        .to_string()
}

/// Colours for outcomes: on when stdout is a terminal, off when piped or with `NO_COLOR`.
#[derive(Debug, Clone, Copy)]
pub enum Paint {
    Good,
    Bad,
    Warn,
    Dim,
}

pub fn colour_on() -> bool {
    use std::io::IsTerminal as _;
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
    })
}

pub fn paint(p: Paint, text: &str) -> String {
    if !colour_on() {
        return text.to_string();
    }
    let code = match p {
        Paint::Good => "32",
        Paint::Bad => "31",
        Paint::Warn => "33",
        Paint::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// "just now", "42s ago", "5m ago", "3h ago", "2d ago".
pub fn format_age(now_ms: i64, then_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".into();
    }
    let secs = (now_ms - then_ms).max(0) / 1000;
    match secs {
        0..=1 => "just now".into(),
        2..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Prints left-aligned columns separated by two spaces.
/// Characters a terminal shows (colour codes take no room).
fn shown_width(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

pub fn print_columns<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: [usize; N] = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(shown_width(cell));
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(shown_width(c)))))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(format_age(10_000, 0), "never");
        assert_eq!(format_age(10_000, 9_500), "just now");
        assert_eq!(format_age(100_000, 58_000), "42s ago");
        assert_eq!(format_age(400_000, 100_000), "5m ago");
    }

    #[test]
    fn colour_codes_take_no_room_in_columns() {
        assert_eq!(shown_width("\x1b[32msucceeded\x1b[0m"), 9);
        assert_eq!(shown_width("✓ ok"), 4);
    }

    #[test]
    fn human_times_show_their_zone() {
        assert_eq!(human_time_in(0, true), "");
        assert_eq!(
            human_time_in(1_700_000_000_000, true),
            "2023-11-14 22:13:20 UTC"
        );
        let local = human_time_in(1_700_000_000_000, false);
        assert!(
            local.len() == "2023-11-14 22:13:20 +00:00".len()
                && (local.ends_with(":00") || local.ends_with(":30") || local.ends_with(":45")),
            "{local}"
        );
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(format_time(0), "");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}

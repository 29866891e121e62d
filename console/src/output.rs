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
pub fn print_columns<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: [usize; N] = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
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
    fn times_are_rfc3339() {
        assert_eq!(format_time(0), "");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}

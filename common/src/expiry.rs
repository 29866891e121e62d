//! Certificate expiry as operators read it: days left, the 30-day warning window and the
//! marks `EXPIRED` / `expires in N days`, shared by `pki list`, `agents` and the coordinator's
//! session log, so all three say the same thing about the same certificate.

/// A certificate expiring within this many days is warned about.
pub const WARN_WITHIN_DAYS: i64 = 30;

/// How often an agent looks at its certificate and key files for a renewed pair, unless
/// agent.toml says otherwise (`cert_check_secs`).
pub const DEFAULT_CERT_CHECK_SECS: u64 = 5;

const DAY: i64 = 86_400;

/// Where a certificate stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// More than `WARN_WITHIN_DAYS` left.
    Valid {
        days_left: i64,
    },
    /// Within `WARN_WITHIN_DAYS`: renew it.
    Soon {
        days_left: i64,
    },
    Expired,
}

impl Expiry {
    /// Days left are counted up: a certificate with 9.5 days left has 10 (it is valid on
    /// the tenth day), one with an hour left has 1; none left is expired.
    pub fn at(not_after_unix: i64, now_unix: i64) -> Self {
        let left = not_after_unix.saturating_sub(now_unix);
        if left <= 0 {
            return Expiry::Expired;
        }
        let days_left = left.saturating_add(DAY - 1) / DAY;
        if days_left <= WARN_WITHIN_DAYS {
            Expiry::Soon { days_left }
        } else {
            Expiry::Valid { days_left }
        }
    }

    /// Days left (0 once expired).
    pub fn days_left(self) -> i64 {
        match self {
            Expiry::Valid { days_left } | Expiry::Soon { days_left } => days_left,
            Expiry::Expired => 0,
        }
    }

    /// `ok`, `expiring` or `expired`, for JSON.
    pub fn status(self) -> &'static str {
        match self {
            Expiry::Valid { .. } => "ok",
            Expiry::Soon { .. } => "expiring",
            Expiry::Expired => "expired",
        }
    }

    /// `EXPIRED`, `expires in N days`, or nothing for a certificate with time to spare.
    pub fn mark(self) -> Option<String> {
        match self {
            Expiry::Valid { .. } => None,
            Expiry::Soon { days_left: 1 } => Some("expires in 1 day".into()),
            Expiry::Soon { days_left } => Some(format!("expires in {days_left} days")),
            Expiry::Expired => Some("EXPIRED".into()),
        }
    }
}

/// Seconds since the epoch now (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    crate::now_unix_ms() / 1000
}

/// RFC 3339 (UTC) for a Unix time in seconds; empty if out of range.
pub fn format_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_and_days() {
        let now = 1_000_000_000;
        assert_eq!(Expiry::at(now, now), Expiry::Expired);
        assert_eq!(Expiry::at(now - 1, now).mark().as_deref(), Some("EXPIRED"));
        assert_eq!(Expiry::at(now + 3600, now), Expiry::Soon { days_left: 1 });
        assert_eq!(
            Expiry::at(now + 10 * DAY - 5, now).mark().as_deref(),
            Some("expires in 10 days")
        );
        assert_eq!(
            Expiry::at(now + 30 * DAY, now),
            Expiry::Soon { days_left: 30 }
        );
        assert_eq!(
            Expiry::at(now + 30 * DAY + 1, now),
            Expiry::Valid { days_left: 31 }
        );
        assert_eq!(Expiry::at(now + 365 * DAY, now).mark(), None);
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
    }
}

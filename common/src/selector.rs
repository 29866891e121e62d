//! Label selectors: `role=web,env=prod` (all terms must match). The key `host` matches the
//! host id, so `host=web-1` picks one host.

use std::collections::BTreeMap;
use std::collections::HashMap;

/// A parsed selector; the empty selector matches every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    terms: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("selector term `{term}` is not KEY=VALUE (example: role=web,env=prod)")]
    NotKeyValue { term: String },
    #[error(
        "selector term `{term}`: key and value may only hold letters, digits, `.`, `_`, `-` and `/`"
    )]
    BadCharacter { term: String },
    #[error("label `{term}`: the key `host` is reserved (`host=ID` selects by host id)")]
    ReservedKey { term: String },
    #[error("selector names key `{key}` twice")]
    DuplicateKey { key: String },
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// Checks one inventory label: both parts as a selector term allows, and not the key `host`
/// (a selector's `host=` always means the host id, so a label of that name could never match).
pub fn validate_label(key: &str, value: &str) -> Result<(), SelectorError> {
    let term = format!("{key}={value}");
    if !valid_part(key) || !valid_part(value) {
        return Err(SelectorError::BadCharacter { term });
    }
    if key == "host" {
        return Err(SelectorError::ReservedKey { term });
    }
    Ok(())
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut terms = BTreeMap::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let Some((key, value)) = term.split_once('=') else {
                return Err(SelectorError::NotKeyValue {
                    term: term.to_string(),
                });
            };
            let (key, value) = (key.trim(), value.trim());
            if !valid_part(key) || !valid_part(value) {
                return Err(SelectorError::BadCharacter {
                    term: term.to_string(),
                });
            }
            if terms.insert(key.to_string(), value.to_string()).is_some() {
                return Err(SelectorError::DuplicateKey {
                    key: key.to_string(),
                });
            }
        }
        Ok(Self { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// True when every term matches the host: `host=` against its id, others against labels.
    pub fn matches(&self, host_id: &str, labels: &HashMap<String, String>) -> bool {
        self.terms.iter().all(|(k, v)| {
            if k == "host" {
                host_id == v
            } else {
                labels.get(k) == Some(v)
            }
        })
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.terms.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_all_terms() {
        let sel = Selector::parse("role=web, env=prod").expect("valid selector");
        assert!(sel.matches(
            "h1",
            &labels(&[("role", "web"), ("env", "prod"), ("x", "y")])
        ));
        assert!(!sel.matches("h1", &labels(&[("role", "web")])));
        assert!(!sel.matches("h1", &labels(&[("role", "db"), ("env", "prod")])));
    }

    #[test]
    fn host_key_matches_id_and_empty_matches_all() {
        let sel = Selector::parse("host=web-1").expect("valid selector");
        assert!(sel.matches("web-1", &labels(&[])));
        assert!(!sel.matches("web-2", &labels(&[])));
        assert!(
            Selector::parse("")
                .expect("empty ok")
                .matches("any", &labels(&[]))
        );
    }

    #[test]
    fn rejects_malformed() {
        for (text, want) in [
            (
                "role",
                SelectorError::NotKeyValue {
                    term: "role".into(),
                },
            ),
            (
                "role=",
                SelectorError::BadCharacter {
                    term: "role=".into(),
                },
            ),
            (
                "role=w eb",
                SelectorError::BadCharacter {
                    term: "role=w eb".into(),
                },
            ),
            ("a=1,a=2", SelectorError::DuplicateKey { key: "a".into() }),
        ] {
            assert_eq!(Selector::parse(text), Err(want), "input {text:?}");
        }
    }

    #[test]
    fn labels_are_checked_like_selector_terms() {
        assert_eq!(validate_label("role", "db"), Ok(()));
        assert!(matches!(
            validate_label("host", "db-1"),
            Err(SelectorError::ReservedKey { .. })
        ));
        for (k, v) in [
            ("", "x"),
            ("k", ""),
            ("a b", "x"),
            ("k", "x;y"),
            ("k", &"v".repeat(129)),
        ] {
            assert!(validate_label(k, v).is_err(), "{k}={v}");
        }
    }
}

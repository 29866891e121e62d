//! Fuzz-like property tests (proptest) of everything the agent accepts from outside: each
//! parameter validator in `actions::validate`, the whole-step check `actions::validate`, and
//! `Config::load` of `agent.toml`. Inputs are arbitrary and near-miss strings (unicode, control
//! characters, NUL, over-long values, valid values with a few edits). Each property checks that
//! nothing panics and that whatever is accepted satisfies an oracle written here from the
//! documented grammar; strategies that generate only valid values check the converse, so an
//! over-strict validator fails too.
//!
//! Config files are written 0600 and every path they name lies inside the
//! test's temp dir: the `state_dir` line is fixed at the top of each fuzzed file (TOML refuses a
//! second definition), so no mutation can point it anywhere else.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{TestCaseError, TestRunner};
use rollback_agent::Config;
use rollback_agent::actions::{self, ACTIONS, Action, validate};
use rollback_common::proto::Step;

// ---------------------------------------------------------------------------------------------
// Runner set-up

/// Modest case counts (the whole file runs in seconds) and no regression files written next
/// to the sources: a failure prints its minimal input instead.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `test` over `strategy` with a fixture the test owns (proptest! cannot share one).
fn check<S: Strategy>(n: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut runner = TestRunner::new(cases(n));
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// String strategies

/// Characters that break grammars: controls, NUL, whitespace, bidi and zero-width marks,
/// non-ASCII letters and digits, shell and URL metacharacters.
const EDGE: &[char] = &[
    '\0', '\n', '\r', '\t', '\u{b}', '\u{1b}', ' ', '\u{7f}', '\u{85}', '\u{a0}', '\u{200b}',
    '\u{202e}', '\u{feff}', 'é', 'ß', 'İ', '€', '😀', '٣', 'Ａ', '@', '{', '}', '$', ';', '|', '&',
    '`', '\'', '"', '\\', '*', '?', '[', ']', '=', ',', ':', '+', '#', '%', '~', '^', '!', '<',
    '>', '(', ')', '.', '/', '-', '_',
];

fn chars_of(s: &str) -> Vec<char> {
    s.chars().collect()
}

/// Arbitrary text: any unicode, lossy bytes, edge characters, very long runs.
fn noise() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>(),
        vec(any::<char>(), 0..48).prop_map(String::from_iter),
        vec(any::<u8>(), 0..48).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        vec(select(EDGE), 0..24).prop_map(String::from_iter),
        (
            vec(any::<char>(), 0..3),
            0usize..400,
            select(chars_of("a0/.-_")),
            vec(any::<char>(), 0..3)
        )
            .prop_map(|(pre, n, c, post)| {
                pre.into_iter()
                    .chain(std::iter::repeat_n(c, n))
                    .chain(post)
                    .collect()
            }),
    ]
    .boxed()
}

/// Mostly the grammar's own alphabet with an edge character now and then.
fn near(alphabet: &str, max: usize) -> BoxedStrategy<String> {
    vec(
        prop_oneof![8 => select(chars_of(alphabet)), 1 => select(EDGE)],
        0..=max,
    )
    .prop_map(String::from_iter)
    .boxed()
}

/// One small edit of a string.
#[derive(Debug, Clone)]
enum Edit {
    Insert(Index, char),
    Replace(Index, char),
    Delete(Index),
    Truncate(Index),
    Prepend(char),
    Append(String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let c = || {
        prop_oneof![
            select(EDGE),
            select(chars_of(".-/_~^:+,=?&")),
            any::<char>()
        ]
    };
    prop_oneof![
        (any::<Index>(), c()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<Index>(), c()).prop_map(|(i, c)| Edit::Replace(i, c)),
        any::<Index>().prop_map(Edit::Delete),
        any::<Index>().prop_map(Edit::Truncate),
        c().prop_map(Edit::Prepend),
        prop_oneof![
            select(vec![
                ".lock", "/", "..", "//", " ", "\n", "\0", "é", "a", "0", ","
            ])
            .prop_map(String::from),
            (1usize..300).prop_map(|n| "x".repeat(n)),
        ]
        .prop_map(Edit::Append),
    ]
}

fn apply(s: &str, edits: &[Edit]) -> String {
    let mut v: Vec<char> = s.chars().collect();
    for e in edits {
        match e {
            Edit::Insert(i, c) => v.insert(i.index(v.len() + 1), *c),
            Edit::Replace(i, c) if !v.is_empty() => {
                let at = i.index(v.len());
                v[at] = *c;
            }
            Edit::Delete(i) if !v.is_empty() => {
                v.remove(i.index(v.len()));
            }
            Edit::Truncate(i) => v.truncate(i.index(v.len() + 1)),
            Edit::Prepend(c) => v.insert(0, *c),
            Edit::Append(s) => v.extend(s.chars()),
            Edit::Replace(..) | Edit::Delete(_) => {}
        }
    }
    v.into_iter().collect()
}

/// Valid values with one to three edits: the near misses a grammar check must catch.
fn mutated(valid: BoxedStrategy<String>) -> BoxedStrategy<String> {
    (valid, vec(edit(), 1..4))
        .prop_map(|(s, e)| apply(&s, &e))
        .boxed()
}

/// Fragments that break one rule or another of the grammars here.
const TRICKS: &[&str] = &[
    ".lock", "/", "..", "//", "-", ".", "_", "+", "~", "^", ":", "?", "=", "&", ",", " ", "\t",
    "\0", "\n", "é", "@{1}", "\u{202e}",
];

/// A valid value with a trick put in front, at the end, or in the middle.
fn tricked(valid: BoxedStrategy<String>) -> BoxedStrategy<String> {
    (valid, select(TRICKS), 0..3usize)
        .prop_map(|(v, t, at)| match at {
            0 => format!("{t}{v}"),
            1 => format!("{v}{t}"),
            _ => {
                let mid = v
                    .char_indices()
                    .nth(v.chars().count() / 2)
                    .map_or(0, |(i, _)| i);
                format!("{}{t}{}", &v[..mid], &v[mid..])
            }
        })
        .boxed()
}

/// What a validator is fuzzed with: noise, near-grammar text, mutated and valid values.
fn fuzz(valid: BoxedStrategy<String>, alphabet: &str, max: usize) -> BoxedStrategy<String> {
    prop_oneof![
        2 => noise(),
        2 => near(alphabet, max),
        3 => mutated(valid.clone()),
        3 => tricked(valid.clone()),
        1 => valid,
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Oracles: the documented grammars, written independently of the validators (on bytes).

fn in_set(b: u8, extra: &[u8]) -> bool {
    b.is_ascii_alphanumeric() || extra.contains(&b)
}

/// `validate::revision`: 1-100 of `[A-Za-z0-9._/~^-]`, starting with a letter or digit, no
/// `..` or `//`, no trailing `/`, no `.lock` suffix.
fn revision_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=100).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|&c| in_set(c, b"._/~^-"))
        && !b.windows(2).any(|w| w == b".." || w == b"//")
        && b.last() != Some(&b'/')
        && !b.ends_with(b".lock")
}

/// `validate::alembic_revision`: 1-64 of `[A-Za-z0-9_]`, not starting with `_` (`base` fits).
fn alembic_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len()) && b[0] != b'_' && b.iter().all(|&c| in_set(c, b"_"))
}

/// A decimal number: ASCII digits only, or, when `plus` is set, also one leading `+` (what
/// Rust's integer parsing takes). `None` for anything else or a value beyond `u64`.
fn decimal(text: &str, plus: bool) -> Option<u64> {
    let digits = if plus {
        text.strip_prefix('+').unwrap_or(text)
    } else {
        text
    };
    // At most ten digits (`validate::number` bounds the text, so `00000000001` is refused).
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.bytes().try_fold(0u64, |n, b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `validate::count`: a whole number within `1..=max`.
fn count_ok(text: &str, max: u32, plus: bool) -> Option<u32> {
    decimal(text, plus)
        .filter(|n| (1..=u64::from(max)).contains(n))
        .map(|n| u32::try_from(n).expect("at most max"))
}

/// `validate::backup_file`'s name grammar: 1-255 of `[A-Za-z0-9._+:-]`, not starting with
/// `-` or `.` (so no `/`, NUL or `..` component).
fn backup_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=255).contains(&b.len())
        && b[0] != b'-'
        && b[0] != b'.'
        && b.iter().all(|&c| in_set(c, b"._+:-"))
}

/// `validate::endpoint`: a path of `[A-Za-z0-9/._?=&-]` starting with `/`, at most 200
/// characters, no `..`, not starting with `//`.
fn endpoint_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.first() == Some(&b'/')
        && b.len() <= 200
        && !b.starts_with(b"//")
        && !b.windows(2).any(|w| w == b"..")
        && b.iter().all(|&c| in_set(c, b"/._?=&-"))
}

/// `validate::patterns`: the comma-separated, trimmed, non-empty pieces, 1 to 16 of them,
/// each at most 200 bytes with no control character.
fn patterns_expected(text: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for piece in text.split(',') {
        let p = piece.trim();
        if p.is_empty() {
            continue;
        }
        if p.len() > 200 || p.chars().any(char::is_control) {
            return None;
        }
        out.push(p.to_string());
    }
    (1..=16).contains(&out.len()).then_some(out)
}

/// Snapshot and run ids: 1-64 of `[A-Za-z0-9_-]`.
fn id_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len()) && b.iter().all(|&c| in_set(c, b"_-"))
}

/// `snapshot.take label`: at most 200 bytes, no control character.
fn label_text_ok(s: &str) -> bool {
    s.len() <= 200 && !s.chars().any(char::is_control)
}

/// `identity::validate_name` (host ids): 1-63 of `[A-Za-z0-9._-]`, starting with a letter or
/// digit.
fn host_id_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|&c| in_set(c, b"._-"))
}

/// Label keys and values: 1-128 of `[A-Za-z0-9._/-]`.
fn label_part_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=128).contains(&b.len()) && b.iter().all(|&c| in_set(c, b"._/-"))
}

/// A systemd service unit name: at most 255 of `[A-Za-z0-9@._:-]`, ending `.service`, not
/// starting with `-` or `.`.
fn unit_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 255
        && b.ends_with(b".service")
        && b[0] != b'-'
        && b[0] != b'.'
        && b.iter().all(|&c| in_set(c, b"@._:-"))
}

// ---------------------------------------------------------------------------------------------
// Valid-value strategies, straight from the grammars.

const REVISION_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/~^-";

fn valid_revision() -> BoxedStrategy<String> {
    prop_oneof![
        "[0-9a-f]{40}",
        "[0-9a-f]{64}",
        "[a-zA-Z0-9]{100}",
        select(vec![
            "main",
            "HEAD",
            "HEAD~1",
            "HEAD^",
            "HEAD^^~2",
            "v1.2.3",
            "release/v2",
            "origin/main",
            "a",
            "0",
        ])
        .prop_map(String::from),
        "[A-Za-z0-9][A-Za-z0-9._/~^-]{0,99}".prop_filter("ref grammar", |s| revision_ok(s)),
    ]
    .boxed()
}

fn valid_alembic() -> BoxedStrategy<String> {
    prop_oneof![
        "[A-Za-z0-9][A-Za-z0-9_]{0,63}",
        "[0-9a-f]{12}",
        Just("base".to_string()),
    ]
    .boxed()
}

fn valid_endpoint() -> BoxedStrategy<String> {
    prop_oneof![
        select(vec![
            "/",
            "/healthz",
            "/readyz",
            "/health?full=1&x=y",
            "/a/b/c.json"
        ])
        .prop_map(String::from),
        "/[A-Za-z0-9/._?=&-]{0,199}".prop_filter("endpoint grammar", |s| endpoint_ok(s)),
    ]
    .boxed()
}

fn valid_backup_name() -> BoxedStrategy<String> {
    prop_oneof![
        "[A-Za-z0-9_+:][A-Za-z0-9._+:-]{0,40}",
        "[A-Za-z0-9][A-Za-z0-9._+:-]{254}",
    ]
    .boxed()
}

/// One pattern: printable, no comma, no surrounding whitespace, at most 200 bytes.
fn valid_pattern() -> BoxedStrategy<String> {
    prop_oneof![
        "[A-Za-z0-9_:.()\\[\\] -]{1,60}",
        "[^,\\p{C}]{1,50}",
        select(vec![
            "ERROR",
            "Traceback (most recent call last)",
            "panic",
            "é😀"
        ])
        .prop_map(String::from),
    ]
    .prop_map(|p| p.trim().to_string())
    .prop_filter("non-empty, at most 200 bytes", |p| {
        !p.is_empty() && p.len() <= 200
    })
    .boxed()
}

/// A valid `patterns` value and the list it means.
fn valid_patterns() -> BoxedStrategy<(String, Vec<String>)> {
    (
        vec(valid_pattern(), 1..=16),
        select(vec![",", ", ", " ,\t", ",,", " , "]),
        select(vec!["", ",", " ", ", "]),
    )
        .prop_map(|(ps, sep, edge)| (format!("{edge}{}{edge}", ps.join(sep)), ps))
        .boxed()
}

fn valid_id() -> BoxedStrategy<String> {
    "[A-Za-z0-9_-]{1,64}".boxed()
}

// ---------------------------------------------------------------------------------------------
// The parameter validators

proptest! {
    // Pure functions of a string: cheap, so many cases.
    #![proptest_config(cases(1024))]

    #[test]
    fn revision_accepts_only_its_grammar(s in fuzz(valid_revision(), REVISION_CHARS, 120)) {
        let r = actions::validate::revision(&s);
        prop_assert!(r.is_err() || revision_ok(&s), "accepted {s:?}");
    }

    #[test]
    fn revision_accepts_every_valid_revision(s in valid_revision()) {
        prop_assert!(revision_ok(&s));
        prop_assert_eq!(actions::validate::revision(&s), Ok(()), "{:?}", s);
    }

    #[test]
    fn alembic_revision_accepts_only_its_grammar(
        s in fuzz(valid_alembic(), "abcXYZ0189_", 80),
    ) {
        let r = actions::validate::alembic_revision(&s);
        prop_assert!(r.is_err() || alembic_ok(&s), "accepted {s:?}");
    }

    #[test]
    fn alembic_revision_accepts_every_valid_id(s in valid_alembic()) {
        prop_assert_eq!(actions::validate::alembic_revision(&s), Ok(()), "{:?}", s);
    }

    #[test]
    fn count_accepts_only_whole_numbers_in_range(
        text in fuzz((0u64..1000).prop_map(|n| n.to_string()).boxed(), "0123456789+- ", 25),
        max in prop_oneof![0u32..=1000, Just(u32::MAX)],
    ) {
        match actions::validate::count(&text, max) {
            Ok(n) => prop_assert_eq!(Some(n), count_ok(&text, max, false), "accepted {:?}", text),
            Err(_) => prop_assert_eq!(count_ok(&text, max, false), None, "refused {:?}", text),
        }
    }

    #[test]
    fn count_accepts_only_digits(
        text in prop_oneof![
            fuzz((0u64..1000).prop_map(|n| n.to_string()).boxed(), "0123456789+", 12),
            "\\+[1-9]",
        ],
        max in 9u32..=1000,
    ) {
        if actions::validate::count(&text, max).is_ok() {
            prop_assert!(count_ok(&text, max, false).is_some(), "accepted {:?}", text);
        }
    }

    #[test]
    fn count_accepts_every_number_in_range(max in 1u32..=u32::MAX, pick in any::<Index>()) {
        let n = u32::try_from(pick.index(max as usize) + 1).expect("in range");
        prop_assert_eq!(actions::validate::count(&n.to_string(), max), Ok(n));
    }

    #[test]
    fn endpoint_accepts_only_its_grammar(
        s in fuzz(valid_endpoint(), "/abz09._?=&-", 220),
    ) {
        let r = actions::validate::endpoint(&s);
        prop_assert!(r.is_err() || endpoint_ok(&s), "accepted {s:?}");
    }

    #[test]
    fn endpoint_accepts_every_valid_path(s in valid_endpoint()) {
        prop_assert_eq!(actions::validate::endpoint(&s), Ok(()), "{:?}", s);
    }

    #[test]
    fn patterns_accepts_only_its_grammar(
        text in fuzz(
            valid_patterns().prop_map(|(t, _)| t).boxed(),
            "abc ,\t",
            300,
        ).prop_union(
            // Too many patterns, or one too long.
            prop_oneof![
                (vec(valid_pattern(), 15..=20), select(vec![",", ", "]))
                    .prop_map(|(ps, sep)| ps.join(sep)),
                (0usize..3, 195usize..=205).prop_map(|(pad, n)| format!(
                    "a,{}{},b",
                    " ".repeat(pad),
                    "x".repeat(n)
                )),
            ]
            .boxed(),
        ),
    ) {
        match actions::validate::patterns(&text) {
            Ok(ps) => {
                prop_assert!((1..=16).contains(&ps.len()));
                for p in &ps {
                    prop_assert!(!p.is_empty() && p.len() <= 200, "{p:?}");
                    prop_assert!(!p.contains(',') && p.trim() == p, "{p:?}");
                    prop_assert!(!p.chars().any(char::is_control), "{p:?}");
                    prop_assert!(text.contains(p.as_str()));
                }
                prop_assert_eq!(Some(ps), patterns_expected(&text));
            }
            Err(_) => prop_assert_eq!(patterns_expected(&text), None, "refused {:?}", text),
        }
    }

    #[test]
    fn patterns_accepts_every_valid_list((text, ps) in valid_patterns()) {
        prop_assert_eq!(actions::validate::patterns(&text), Ok(ps));
    }

    #[test]
    fn is_plain_relative_accepts_no_root_and_no_dot_dot(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..40),
            vec(select(b"/.a\0\xff".to_vec()), 0..12),
        ],
    ) {
        let p = Path::new(OsStr::from_bytes(&bytes));
        if actions::validate::is_plain_relative(p) {
            let segments: Vec<&[u8]> = bytes.split(|&b| b == b'/').collect();
            prop_assert!(bytes.first() != Some(&b'/'), "accepted {p:?}");
            prop_assert!(segments[0] != b".", "accepted {p:?}");
            prop_assert!(!segments.contains(&&b".."[..]), "accepted {p:?}");
            let joined = Path::new("/base").join(p);
            prop_assert!(joined.starts_with("/base"));
            prop_assert!(joined.components().all(|c| c != Component::ParentDir));
        }
    }

    #[test]
    fn is_plain_relative_accepts_every_relative_name(
        segments in vec(
            vec(any::<u8>(), 1..16)
                .prop_map(|mut s| { s.retain(|&b| b != b'/'); s })
                .prop_filter("a name", |s| !s.is_empty() && s != b"." && s != b".."),
            1..5,
        ),
    ) {
        let bytes = segments.join(&b'/');
        let p = Path::new(OsStr::from_bytes(&bytes));
        prop_assert!(actions::validate::is_plain_relative(p), "refused {p:?}");
    }
}

#[test]
fn is_plain_relative_names_something() {
    for p in ["", "a/..", "./a", "/a", ".."] {
        assert!(!actions::validate::is_plain_relative(Path::new(p)), "{p:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A host: a temp dir holding everything a full agent.toml names.

const EXECUTABLES: &[&str] = &["systemctl", "git", "alembic", "pg_dump", "pg_restore"];

/// Backups that are regular files inside the backup dir under a valid name.
const GOOD_BACKUPS: &[&str] = &[
    "good.dump",
    "db_2024-01-01T00:00:00+00:00.dump",
    "a..b",
    "alias.dump",
];

/// Entries of the backup dir that must be refused: escaping or dangling symlinks, a dir, a
/// socket, files whose names are outside the grammar.
const BAD_BACKUPS: &[&str] = &[
    "escape.dump",
    "inner-link.dump",
    "dangling.dump",
    "loop.dump",
    "sub",
    "dir.dump",
    "sock.dump",
    "-dash.dump",
    ".hidden",
    "sp ace.dump",
    "ünï.dump",
    "semi;colon.dump",
];

/// Names that try to leave the backup dir or sneak a file in.
const TRAVERSALS: &[&str] = &[
    "../secret",
    "sub/inner.dump",
    "/etc/passwd",
    "./good.dump",
    "good.dump/",
    "good.dump\0",
    "good.dump\n",
    " good.dump",
    "GOOD.DUMP",
    "sub/../good.dump",
    "backups/good.dump",
    "..",
    ".",
    "~",
    "good.dump/.",
];

struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    backups: PathBuf,
    _socket: std::os::unix::net::UnixListener,
}

fn private_dir(p: &Path) {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .expect("mkdir");
}

/// Writes a file readable by its owner only (what `Config::load` and the TLS key demand).
fn write_private(path: &Path, bytes: &[u8]) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing {}: {e}", path.display()),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A TOML basic string holding `s` exactly.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The fixed first line of every config: the state dir, relative to the config dir.
const STATE_LINE: &str = "state_dir = \"state\"\n";

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonical tempdir");
        for d in [
            "bin",
            "tls",
            "app",
            "backups/sub",
            "backups/dir.dump",
            "cfg/state",
        ] {
            private_dir(&root.join(d));
        }
        private_dir(&root.join("cfg/state/snapshots/snap-1"));
        write_private(&root.join("cfg/state/snapshots/snap-1/env"), b"A=1\n");
        for exe in EXECUTABLES {
            let p = root.join("bin").join(exe);
            std::fs::write(&p, b"#!/bin/sh\nexit 0\n").expect("write executable");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for pem in ["ca.pem", "cert.pem", "key.pem"] {
            write_private(&root.join("tls").join(pem), b"not a PEM\n");
        }
        for f in [".env", ".env.backup", "app.log"] {
            write_private(&root.join("app").join(f), b"A=1\n");
        }
        write_private(&root.join("secret"), b"secret\n");
        let backups = root.join("backups");
        for f in GOOD_BACKUPS
            .iter()
            .chain(&[
                "-dash.dump",
                ".hidden",
                "sp ace.dump",
                "ünï.dump",
                "semi;colon.dump",
            ])
            .filter(|f| **f != "alias.dump")
        {
            write_private(&backups.join(f), b"dump");
        }
        write_private(&backups.join("x".repeat(255)), b"dump");
        write_private(&backups.join("sub/inner.dump"), b"dump");
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, backups.join(name)).expect("symlink");
        };
        link(&backups.join("good.dump"), "alias.dump");
        link(&root.join("secret"), "escape.dump");
        link(&backups.join("sub/inner.dump"), "inner-link.dump");
        link(&root.join("missing"), "dangling.dump");
        link(&backups.join("loop.dump"), "loop.dump");
        let socket =
            std::os::unix::net::UnixListener::bind(backups.join("sock.dump")).expect("socket");
        Self {
            _tmp: tmp,
            root,
            backups,
            _socket: socket,
        }
    }

    fn path(&self, rel: &str) -> String {
        q(&self.root.join(rel).display().to_string())
    }

    fn tls_toml(&self) -> String {
        format!(
            "[tls]\nca = {}\ncert = {}\nkey = {}\n",
            self.path("tls/ca.pem"),
            self.path("tls/cert.pem"),
            self.path("tls/key.pem"),
        )
    }

    /// Every profile section, valid: real executables, absolute paths.
    fn profile_toml(&self) -> String {
        format!(
            "[service]\nunit = \"app.service\"\nsystemctl = {}\n\
             [app]\ndir = {}\ngit = {}\nenv_file = {}\nenv_backup = {}\nlog_file = {}\n\
             health_base_url = \"http://127.0.0.1:8000\"\n\
             [alembic]\nbinary = {}\nworkdir = {}\n[alembic.env]\nDATABASE_URL = \"postgresql:///app\"\n\
             [postgres]\npg_dump = {}\npg_restore = {}\nhost = \"127.0.0.1\"\nuser = \"app\"\n\
             database = \"app\"\nbackup_dir = {}\n\
             [timeouts]\ndefault_secs = 300\nmax_secs = 3600\nkill_grace_secs = 5\n\
             [timeouts.actions]\n\"postgres.restore\" = 1800\n",
            self.path("bin/systemctl"),
            self.path("app"),
            self.path("bin/git"),
            self.path("app/.env"),
            self.path("app/.env.backup"),
            self.path("app/app.log"),
            self.path("bin/alembic"),
            self.path("app"),
            self.path("bin/pg_dump"),
            self.path("bin/pg_restore"),
            self.path("backups"),
        )
    }

    /// A complete, valid agent.toml (with or without the profile sections).
    fn config_toml(&self, profile: bool) -> String {
        format!(
            "{STATE_LINE}host_id = \"web-1\"\ncoordinator = \"https://127.0.0.1:7443\"\n\
             reconnect_initial_ms = 100\nreconnect_max_ms = 500\n\
             [labels]\nrole = \"web\"\nenv = \"prod\"\n{}{}",
            self.tls_toml(),
            if profile {
                self.profile_toml()
            } else {
                String::new()
            },
        )
    }

    fn config_path(&self) -> PathBuf {
        self.root.join("cfg/agent.toml")
    }

    fn load(&self, text: &[u8]) -> Result<Config, rollback_agent::config::ConfigError> {
        let path = self.config_path();
        write_private(&path, text);
        Config::load(&path)
    }

    fn config(&self, profile: bool) -> Config {
        self.load(self.config_toml(profile).as_bytes())
            .unwrap_or_else(|e| panic!("the fixture's agent.toml must load: {e}"))
    }

    /// A backup name the step validator must accept: valid name, regular file in the dir.
    fn is_good_backup(&self, name: &str) -> bool {
        backup_name_ok(name)
            && std::fs::metadata(self.backups.join(name)).is_ok_and(|m| m.is_file())
            && std::fs::canonicalize(self.backups.join(name))
                .is_ok_and(|p| p.parent() == Some(self.backups.as_path()))
    }
}

// ---------------------------------------------------------------------------------------------
// backup_file

fn backup_names() -> BoxedStrategy<String> {
    let existing: Vec<String> = GOOD_BACKUPS
        .iter()
        .chain(BAD_BACKUPS)
        .map(|s| s.to_string())
        .chain(["x".repeat(255), "x".repeat(256)])
        .collect();
    prop_oneof![
        3 => select(existing.clone()),
        1 => select(TRAVERSALS).prop_map(String::from),
        3 => fuzz(valid_backup_name(), "abz09._+:-/", 60),
        2 => mutated(select(existing).boxed()),
    ]
    .boxed()
}

#[test]
fn backup_file_accepts_only_regular_files_inside_the_dir() {
    let host = Host::new();
    check(512, backup_names(), |name| {
        match actions::validate::backup_file(&name, &host.backups) {
            Ok(p) => {
                prop_assert!(backup_name_ok(&name), "accepted name {name:?}");
                prop_assert!(p.is_absolute(), "{p:?}");
                prop_assert_eq!(p.parent(), Some(host.backups.as_path()), "{:?}", name);
                let canonical = std::fs::canonicalize(host.backups.join(&name));
                prop_assert_eq!(Some(&p), canonical.as_ref().ok(), "{:?}", name);
                let meta = std::fs::symlink_metadata(&p).expect("accepted path exists");
                prop_assert!(meta.file_type().is_file(), "{p:?} is not a regular file");
                prop_assert!(host.is_good_backup(&name));
            }
            Err(reason) => {
                prop_assert!(!host.is_good_backup(&name), "refused {name:?}: {reason}");
            }
        }
        Ok(())
    });
}

#[test]
fn backup_file_accepts_the_good_backups_and_refuses_the_rest() {
    let host = Host::new();
    for name in GOOD_BACKUPS.iter().copied().chain([&*"x".repeat(255)]) {
        let p = actions::validate::backup_file(name, &host.backups)
            .unwrap_or_else(|e| panic!("{name:?} refused: {e}"));
        assert_eq!(p.parent(), Some(host.backups.as_path()));
    }
    for name in BAD_BACKUPS.iter().chain(TRAVERSALS) {
        assert!(
            actions::validate::backup_file(name, &host.backups).is_err(),
            "{name:?} accepted"
        );
    }
    let missing = host.root.join("no-such-dir");
    assert!(actions::validate::backup_file("good.dump", &missing).is_err());
}

// ---------------------------------------------------------------------------------------------
// The whole-step validator

/// Every parameter each action takes.
fn params_of(action: &str) -> Option<&'static [&'static str]> {
    let params: &'static [&'static str] = match action {
        "service.stop" | "service.start" | "service.restart" | "service.status" => &[],
        "alembic.downgrade" => &["steps", "to_revision"],
        "alembic.current" | "postgres.backup" | "state.read" => &[],
        "alembic.resolve" => &["steps"],
        "postgres.restore" | "postgres.verify" => &["backup"],
        "git.checkout" | "git.resolve" => &["revision"],
        "git.log" => &["count"],
        "file.restore" => &["file", "snapshot"],
        "http.check" => &["endpoint", "expect", "retries", "interval_ms"],
        "snapshot.take" => &["id", "label"],
        "log.scan" => &["patterns"],
        "smoke.run" => &["rounds"],
        "guard.sample" => &["rounds", "log_offset"],
        _ => return None,
    };
    Some(params)
}

const ALL_PARAMS: &[&str] = &[
    "steps",
    "to_revision",
    "backup",
    "revision",
    "count",
    "file",
    "snapshot",
    "endpoint",
    "expect",
    "retries",
    "interval_ms",
    "id",
    "label",
    "patterns",
    "rounds",
    "log_offset",
];

/// Values valid for some parameter, to be paired with any key.
const VALUE_POOL: &[&str] = &[
    "1",
    "20",
    "21",
    "100",
    "0",
    "600",
    "50",
    "60000",
    "200",
    "599",
    "+5",
    "base",
    "0001",
    "main",
    "HEAD~1",
    "good.dump",
    "alias.dump",
    "escape.dump",
    "env",
    "snap-1",
    "snap-2",
    "/readyz",
    "ERROR, panic",
    "a",
    "",
];

fn step(action: &str, params: HashMap<String, String>) -> Step {
    let mut s = Step::new(action, &[]);
    s.params = params;
    s
}

fn action_names() -> BoxedStrategy<String> {
    let known: Vec<String> = ACTIONS.iter().map(|s| s.to_string()).collect();
    prop_oneof![
        4 => select(known.clone()),
        2 => mutated(select(known).boxed()),
        1 => noise(),
    ]
    .boxed()
}

fn param_maps() -> BoxedStrategy<HashMap<String, String>> {
    let key = prop_oneof![
        6 => select(ALL_PARAMS).prop_map(String::from),
        1 => mutated(select(ALL_PARAMS).prop_map(String::from).boxed()),
        1 => noise(),
    ];
    let value = prop_oneof![
        4 => select(VALUE_POOL).prop_map(String::from),
        2 => numbers(),
        2 => mutated(select(VALUE_POOL).prop_map(String::from).boxed()),
        1 => valid_revision(),
        1 => valid_patterns().prop_map(|(t, _)| t),
        2 => noise(),
    ];
    proptest::collection::hash_map(key, value, 0..5).boxed()
}

/// Numbers around every bound a numeric parameter has, and number-like near misses.
fn numbers() -> BoxedStrategy<String> {
    prop_oneof![
        select(vec![
            "0",
            "1",
            "2",
            "9",
            "10",
            "11",
            "19",
            "20",
            "21",
            "49",
            "50",
            "51",
            "99",
            "100",
            "101",
            "599",
            "600",
            "601",
            "999",
            "59999",
            "60000",
            "60001",
            "65535",
            "65536",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "+0",
            "+1",
            "00",
            "01",
            "1.0",
            "1e2",
            " 1",
            "1 ",
            "0x10",
            "½",
            "١",
        ])
        .prop_map(String::from),
        any::<u64>().prop_map(|n| n.to_string()),
        (0u32..70_000).prop_map(|n| n.to_string()),
    ]
    .boxed()
}

/// Whether `value` is one `param` may take on the fixture host (with the lenient number
/// grammar the validators have today; see `count_accepts_only_digits`).
fn param_ok(host: &Host, param: &str, value: &str) -> bool {
    let number = |lo: u64, hi: u64| decimal(value, false).is_some_and(|n| (lo..=hi).contains(&n));
    match param {
        "steps" => number(1, 20),
        "to_revision" => alembic_ok(value),
        "backup" => host.is_good_backup(value),
        "revision" => revision_ok(value),
        "count" => number(1, 100),
        "file" => value == "env",
        "snapshot" => value == "snap-1",
        "endpoint" => endpoint_ok(value),
        "expect" => number(100, 599),
        // `0` literally, else a count (so `+0` is refused while `+1` passes).
        "retries" => value == "0" || number(1, 600),
        "interval_ms" => number(50, 60_000),
        "id" => id_ok(value),
        "label" => label_text_ok(value),
        "patterns" => patterns_expected(value).is_some(),
        // smoke.run and guard.sample both take 1-20 rounds.
        "rounds" => number(1, 20),
        "log_offset" => decimal(value, false).is_some(),
        _ => false,
    }
}

/// Whether `action` is what step action `name` turns into.
fn built_for(name: &str, action: &Action) -> bool {
    match action {
        Action::Service(_) => name.starts_with("service."),
        Action::AlembicDowngrade(_) => name == "alembic.downgrade",
        Action::AlembicCurrent => name == "alembic.current",
        Action::AlembicResolve { .. } => name == "alembic.resolve",
        Action::PostgresRestore { .. } => name == "postgres.restore",
        Action::PostgresBackup => name == "postgres.backup",
        Action::GitCheckout { .. } => name == "git.checkout",
        Action::GitResolve { .. } => name == "git.resolve",
        Action::GitLog { .. } => name == "git.log",
        Action::FileRestore { .. } => name == "file.restore",
        Action::HttpCheck(_) => name == "http.check",
        Action::StateRead => name == "state.read",
        Action::SnapshotTake { .. } => name == "snapshot.take",
        Action::PostgresVerify { .. } => name == "postgres.verify",
        Action::LogScan { .. } => name == "log.scan",
        Action::SmokeRun { .. } => name == "smoke.run",
        Action::GuardSample { .. } => name == "guard.sample",
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Checks an accepted step against the allowlist and the grammars, and the action built.
fn accepted_step_ok(host: &Host, s: &Step, action: &Action) -> Result<(), TestCaseError> {
    let name = s.action.as_str();
    prop_assert!(ACTIONS.contains(&name), "accepted unknown action {name:?}");
    let allowed = params_of(name).expect("every action in ACTIONS has a parameter list");
    for (k, v) in &s.params {
        prop_assert!(
            allowed.contains(&k.as_str()),
            "{name}: accepted parameter {k:?}"
        );
        prop_assert!(param_ok(host, k, v), "{name}: accepted {k} = {v:?}");
    }
    let get = |k: &str| s.params.get(k).map(String::as_str);
    for (action, required) in [
        ("postgres.restore", "backup"),
        ("postgres.verify", "backup"),
        ("git.checkout", "revision"),
        ("git.resolve", "revision"),
        ("snapshot.take", "id"),
    ] {
        if name == action {
            prop_assert!(
                get(required).is_some(),
                "{name} accepted without {required}"
            );
        }
    }
    if name == "alembic.downgrade" {
        prop_assert!(get("steps").is_none() || get("to_revision").is_none());
    }
    prop_assert!(built_for(name, action), "{name} was built as {action:?}");
    match action {
        Action::Service(verb) => {
            let verb = format!("{verb:?}").to_lowercase();
            prop_assert_eq!(Some(verb.as_str()), name.strip_prefix("service."));
        }
        Action::AlembicDowngrade(target) => {
            // `Target` is private to the crate: compared by its Debug form.
            let want = match (get("steps"), get("to_revision")) {
                (None, Some(rev)) => format!("Revision({rev:?})"),
                (steps, _) => format!(
                    "Steps({})",
                    steps.map_or(1, |c| count_ok(c, 20, false).expect("ok"))
                ),
            };
            prop_assert_eq!(format!("{target:?}"), want);
        }
        Action::GitCheckout { revision } | Action::GitResolve { revision } => {
            prop_assert_eq!(Some(revision.as_str()), get("revision"));
        }
        Action::GitLog { count } => {
            prop_assert_eq!(
                *count,
                get("count").map_or(10, |c| count_ok(c, 100, false).expect("ok"))
            );
        }
        Action::AlembicResolve { steps } => {
            prop_assert_eq!(
                *steps,
                get("steps").map_or(1, |c| count_ok(c, 20, false).expect("ok"))
            );
        }
        Action::PostgresRestore { backup } | Action::PostgresVerify { backup } => {
            let named = get("backup").expect("required");
            prop_assert_eq!(backup.parent(), Some(host.backups.as_path()));
            let canonical = std::fs::canonicalize(host.backups.join(named)).ok();
            prop_assert_eq!(Some(backup), canonical.as_ref());
        }
        Action::SnapshotTake { id, label } => {
            prop_assert_eq!(Some(id.as_str()), get("id"));
            prop_assert_eq!(label.as_str(), get("label").unwrap_or(""));
        }
        Action::LogScan { patterns } => {
            if let Some(text) = get("patterns") {
                prop_assert_eq!(Some(patterns.clone()), patterns_expected(text));
            }
        }
        Action::FileRestore { snapshot } => {
            prop_assert_eq!(snapshot.as_deref(), get("snapshot"));
        }
        Action::GuardSample { rounds, log_offset } => {
            prop_assert_eq!(
                *rounds,
                get("rounds").map_or(1, |c| count_ok(c, 20, false).expect("ok"))
            );
            prop_assert_eq!(
                *log_offset,
                get("log_offset").and_then(|v| decimal(v, false))
            );
        }
        Action::SmokeRun { rounds } => {
            prop_assert_eq!(
                *rounds,
                get("rounds").map_or(1, |c| count_ok(c, 20, false).expect("ok"))
            );
        }
        Action::HttpCheck(http) => {
            prop_assert_eq!(
                http.endpoint.as_str(),
                get("endpoint").unwrap_or("/healthz")
            );
            prop_assert!((100..=599).contains(&http.expect));
            prop_assert!(http.retries <= 600);
            prop_assert!((50..=60_000).contains(&http.interval.as_millis()));
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn step_validation_accepts_only_known_actions_and_parameters() {
    let host = Host::new();
    let full = host.config(true);
    check(512, (action_names(), param_maps()), |(name, params)| {
        let s = step(&name, params);
        match validate(&s, &full) {
            Ok(action) => accepted_step_ok(&host, &s, &action)?,
            Err(refusal) => {
                prop_assert_eq!(&refusal.action, &s.action);
                if let Some(p) = &refusal.param {
                    prop_assert!(s.params.contains_key(p) || ALL_PARAMS.contains(&p.as_str()));
                }
                let _ = refusal.to_string();
            }
        }
        Ok(())
    });
}

#[test]
fn step_validation_on_a_host_without_a_profile_accepts_only_profile_free_actions() {
    let host = Host::new();
    let bare = host.config(false);
    check(256, (action_names(), param_maps()), |(name, params)| {
        let s = step(&name, params);
        if let Ok(action) = validate(&s, &bare) {
            prop_assert!(
                matches!(
                    s.action.as_str(),
                    "state.read" | "snapshot.take" | "smoke.run" | "guard.sample"
                ),
                "{:?} accepted on a host with no profile as {action:?}",
                s.action
            );
            accepted_step_ok(&host, &s, &action)?;
        }
        Ok(())
    });
}

fn params(pairs: Vec<(&'static str, Option<String>)>) -> HashMap<String, String> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
}

fn num(lo: u32, hi: u32) -> BoxedStrategy<String> {
    (lo..=hi).prop_map(|n| n.to_string()).boxed()
}

/// Steps whose action and parameters are all valid on the fixture host (full profile).
fn valid_steps() -> BoxedStrategy<Step> {
    use proptest::option::of;
    let bare = select(vec![
        "service.stop",
        "service.start",
        "service.restart",
        "service.status",
        "alembic.current",
        "postgres.backup",
        "state.read",
    ])
    .prop_map(|a| step(a, HashMap::new()));
    let downgrade = prop_oneof![
        Just(None),
        num(1, 20).prop_map(|n| Some(("steps", n))),
        valid_alembic().prop_map(|r| Some(("to_revision", r))),
    ]
    .prop_map(|p| {
        step(
            "alembic.downgrade",
            p.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        )
    });
    let resolve = of(num(1, 20)).prop_map(|n| step("alembic.resolve", params(vec![("steps", n)])));
    let backup = (
        select(vec!["postgres.restore", "postgres.verify"]),
        select(GOOD_BACKUPS),
    )
        .prop_map(|(a, b)| step(a, params(vec![("backup", Some(b.to_string()))])));
    let git = (
        select(vec!["git.checkout", "git.resolve"]),
        valid_revision(),
    )
        .prop_map(|(a, r)| step(a, params(vec![("revision", Some(r))])));
    let log = of(num(1, 100)).prop_map(|n| step("git.log", params(vec![("count", n)])));
    let restore = (of(Just("env".to_string())), of(Just("snap-1".to_string())))
        .prop_map(|(f, s)| step("file.restore", params(vec![("file", f), ("snapshot", s)])));
    let http = (
        of(valid_endpoint()),
        of(num(100, 599)),
        of(num(0, 600)),
        of(num(50, 60_000)),
    )
        .prop_map(|(e, x, r, i)| {
            step(
                "http.check",
                params(vec![
                    ("endpoint", e),
                    ("expect", x),
                    ("retries", r),
                    ("interval_ms", i),
                ]),
            )
        });
    let snap = (valid_id(), of("[^\\p{Cc}]{0,50}")).prop_map(|(id, l)| {
        step(
            "snapshot.take",
            params(vec![("id", Some(id)), ("label", l)]),
        )
    });
    let scan = of(valid_patterns().prop_map(|(t, _)| t))
        .prop_map(|p| step("log.scan", params(vec![("patterns", p)])));
    prop_oneof![
        bare, downgrade, resolve, backup, git, log, restore, http, snap, scan
    ]
    .boxed()
}

#[test]
fn step_validation_accepts_every_valid_step() {
    let host = Host::new();
    let full = host.config(true);
    check(512, valid_steps(), |s| {
        match validate(&s, &full) {
            Ok(action) => accepted_step_ok(&host, &s, &action)?,
            Err(refusal) => prop_assert!(false, "{s:?} refused: {refusal}"),
        }
        Ok(())
    });
}

#[test]
fn step_validation_refuses_a_valid_step_with_an_extra_parameter() {
    let host = Host::new();
    let full = host.config(true);
    let extra = prop_oneof![
        select(ALL_PARAMS).prop_map(String::from),
        mutated(select(ALL_PARAMS).prop_map(String::from).boxed()),
        noise(),
    ];
    check(
        256,
        (valid_steps(), extra, noise()),
        |(mut s, key, value)| {
            let allowed = params_of(&s.action).expect("a known action");
            if allowed.contains(&key.as_str()) {
                return Ok(());
            }
            s.params.insert(key.clone(), value);
            let refusal = validate(&s, &full).expect_err("an unknown parameter is refused");
            prop_assert_eq!(refusal.param.as_deref(), Some(key.as_str()), "{}", refusal);
            Ok(())
        },
    );
}

#[test]
fn step_validation_refuses_a_valid_step_with_one_value_mutated() {
    let host = Host::new();
    let full = host.config(true);
    let replacement = prop_oneof![
        2 => vec(edit(), 1..4).prop_map(Err),
        1 => numbers().prop_map(Ok),
        1 => noise().prop_map(Ok),
    ];
    let case = (valid_steps(), any::<Index>(), replacement);
    check(768, case, |(mut s, pick, replacement)| {
        let mut keys: Vec<String> = s.params.keys().cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort();
        let key = keys[pick.index(keys.len())].clone();
        let value = match replacement {
            Ok(v) => v,
            Err(edits) => apply(&s.params[&key], &edits),
        };
        s.params.insert(key.clone(), value.clone());
        match validate(&s, &full) {
            Ok(action) => accepted_step_ok(&host, &s, &action)?,
            Err(refusal) => {
                prop_assert!(!param_ok(&host, &key, &value), "{s:?} refused: {refusal}");
                prop_assert_eq!(refusal.param.as_deref(), Some(key.as_str()), "{}", refusal);
            }
        }
        Ok(())
    });
}

/// Values valid for `param` on the fixture host.
fn valid_value(param: &str) -> BoxedStrategy<String> {
    match param {
        "steps" => num(1, 20),
        "to_revision" => valid_alembic(),
        "backup" => select(GOOD_BACKUPS).prop_map(String::from).boxed(),
        "revision" => valid_revision(),
        "count" => num(1, 100),
        "file" => Just("env".to_string()).boxed(),
        "snapshot" => Just("snap-1".to_string()).boxed(),
        "endpoint" => valid_endpoint(),
        "expect" => num(100, 599),
        "retries" => num(0, 600),
        "interval_ms" => num(50, 60_000),
        "id" => valid_id(),
        "label" => "[^\\p{Cc}]{0,50}".boxed(),
        "patterns" => valid_patterns().prop_map(|(t, _)| t).boxed(),
        "rounds" => num(1, 20),
        "log_offset" => (0u64..10_000_000_000).prop_map(|n| n.to_string()).boxed(),
        other => panic!("no valid values for {other}"),
    }
}

/// Values that name something real on the host by a path a grammar must refuse.
const TRAPS: &[&str] = &[
    "snap-1/",
    "snap-1/.",
    "./snap-1",
    "../snapshots/snap-1",
    "snap-1/../snap-1",
    "../secret",
    "sub/inner.dump",
    "./good.dump",
    "good.dump/",
    "../backups/good.dump",
    "escape.dump",
    "env/",
    "./env",
    "/healthz/../x",
    "//evil/healthz",
    "http://evil/",
    "--upload-pack=touch /tmp/x",
    "-h",
    "HEAD@{1}",
    "main.lock",
];

#[test]
fn step_parameters_accept_only_their_grammar() {
    let host = Host::new();
    let full = host.config(true);
    let pairs: Vec<(&str, &str)> = ACTIONS
        .iter()
        .flat_map(|a| {
            let params = params_of(a).expect("known action");
            params.iter().map(move |p| (*a, *p))
        })
        .collect();
    let case = select(pairs).prop_flat_map(|(action, param)| {
        let value = prop_oneof![
            4 => fuzz(valid_value(param), "abz09._-/~^:+?=&, ", 40),
            1 => select(TRAPS).prop_map(String::from),
            1 => numbers(),
        ];
        (Just(action), Just(param), value)
    });
    check(1024, case, |(action, param, value)| {
        let mut s = step(action, HashMap::new());
        for (a, required, v) in [
            ("postgres.restore", "backup", "good.dump"),
            ("postgres.verify", "backup", "good.dump"),
            ("git.checkout", "revision", "main"),
            ("git.resolve", "revision", "main"),
            ("snapshot.take", "id", "snap-x"),
        ] {
            if a == action {
                s.params.insert(required.to_string(), v.to_string());
            }
        }
        s.params.insert(param.to_string(), value.clone());
        match validate(&s, &full) {
            Ok(a) => accepted_step_ok(&host, &s, &a)?,
            Err(refusal) => {
                prop_assert!(!param_ok(&host, param, &value), "{s:?} refused: {refusal}");
                prop_assert_eq!(refusal.param.as_deref(), Some(param), "{}", refusal);
            }
        }
        Ok(())
    });
}

#[test]
fn alembic_downgrade_takes_steps_or_a_revision_not_both() {
    let host = Host::new();
    let full = host.config(true);
    check(128, (num(1, 20), valid_alembic()), |(steps, rev)| {
        let s = step(
            "alembic.downgrade",
            params(vec![("steps", Some(steps)), ("to_revision", Some(rev))]),
        );
        prop_assert!(validate(&s, &full).is_err(), "{s:?} accepted");
        Ok(())
    });
}

/// Every numeric step parameter and its documented range.
const NUMERIC: &[(&str, &str, u64, u64)] = &[
    ("alembic.downgrade", "steps", 1, 20),
    ("alembic.resolve", "steps", 1, 20),
    ("git.log", "count", 1, 100),
    ("http.check", "expect", 100, 599),
    ("http.check", "retries", 0, 600),
    ("http.check", "interval_ms", 50, 60_000),
];

#[test]
fn step_numbers_accept_exactly_their_range() {
    let host = Host::new();
    let full = host.config(true);
    let case = (
        select(NUMERIC),
        prop_oneof![
            2 => (any::<bool>(), -3i64..=3).prop_map(|(hi, d)| (Some(hi), d, 0)),
            1 => (0u64..=120_000).prop_map(|n| (None, 0, n)),
            1 => any::<u64>().prop_map(|n| (None, 0, n)),
        ],
    );
    check(
        512,
        case,
        |((action, param, lo, hi), (near, offset, raw))| {
            let n = match near {
                Some(at_hi) => {
                    let bound = if at_hi { hi } else { lo };
                    bound.saturating_add_signed(offset)
                }
                None => raw,
            };
            let s = step(action, params(vec![(param, Some(n.to_string()))]));
            let r = validate(&s, &full);
            prop_assert_eq!(
                r.is_ok(),
                (lo..=hi).contains(&n),
                "{} {}={}: {:?}",
                action,
                param,
                n,
                r
            );
            Ok(())
        },
    );
}

#[test]
fn step_numbers_accept_only_digits() {
    let host = Host::new();
    let full = host.config(true);
    for (action, param, value) in [
        ("alembic.downgrade", "steps", "+1"),
        ("alembic.resolve", "steps", "+1"),
        ("git.log", "count", "+5"),
        ("http.check", "expect", "+200"),
        ("http.check", "retries", "+3"),
        ("http.check", "interval_ms", "+500"),
    ] {
        let s = step(action, params(vec![(param, Some(value.to_string()))]));
        assert!(
            validate(&s, &full).is_err(),
            "{action} {param}={value:?} accepted"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Config::load

/// What every loaded config satisfies, whatever the file held.
fn documented_rules(c: &Config) -> Result<(), TestCaseError> {
    prop_assert!(host_id_ok(&c.host_id), "host_id {:?}", c.host_id);
    let urls = c.coordinator_urls();
    prop_assert!(
        urls.as_ref()
            .is_ok_and(|u| !u.is_empty() && u.iter().all(|u| u.url.starts_with("https://"))),
        "coordinators {:?} / {:?}: {:?}",
        c.coordinator,
        c.coordinators,
        urls
    );
    for (k, v) in &c.labels {
        prop_assert!(
            label_part_ok(k) && label_part_ok(v) && k != "host",
            "label {k:?} = {v:?}"
        );
    }
    prop_assert!(
        0 < c.reconnect_initial_ms && c.reconnect_initial_ms <= c.reconnect_max_ms,
        "reconnect {} / {}",
        c.reconnect_initial_ms,
        c.reconnect_max_ms
    );
    for p in [&c.state_dir, &c.tls.ca, &c.tls.cert, &c.tls.key] {
        prop_assert!(
            p.is_absolute(),
            "{p:?} was not resolved against the config dir"
        );
    }
    Ok(())
}

#[test]
fn the_fixture_configs_load() {
    let host = Host::new();
    for profile in [false, true] {
        let c = host.config(profile);
        documented_rules(&c).expect("rules");
        assert_eq!(c.state_dir, host.root.join("cfg/state"));
        assert_eq!(c.host_id, "web-1");
        assert_eq!(c.backoff().0.as_millis(), 100);
        assert_eq!(c.postgres.is_some(), profile);
    }
}

#[test]
fn config_load_survives_arbitrary_bytes() {
    let host = Host::new();
    let bytes = prop_oneof![
        vec(any::<u8>(), 0..512),
        any::<String>().prop_map(String::into_bytes),
        near("abc_=\"'[].\n #{},0123456789", 200).prop_map(String::into_bytes),
    ];
    check(192, bytes, |b| {
        let mut text = STATE_LINE.as_bytes().to_vec();
        text.extend_from_slice(&b);
        if let Ok(c) = host.load(&text) {
            documented_rules(&c)?;
        }
        Ok(())
    });
}

/// One byte-level mutation of a TOML file.
#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    DropLine(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = prop_oneof![
        select(vec![
            b"\"".to_vec(),
            b"'".to_vec(),
            b"[".to_vec(),
            b"]".to_vec(),
            b"[[".to_vec(),
            b"=".to_vec(),
            b"\n".to_vec(),
            b"#".to_vec(),
            b"\\".to_vec(),
            b"\0".to_vec(),
            vec![0xff],
            b"{".to_vec(),
            b".".to_vec(),
            b"0".to_vec(),
            b"-".to_vec(),
            b" ".to_vec(),
            b"\"\"\"".to_vec(),
            b"host = \"x\"\n".to_vec(),
            b"\nreconnect_initial_ms = 0\n".to_vec(),
            b"\n[labels]\n".to_vec(),
            b"\\u0000".to_vec(),
            "é".as_bytes().to_vec(),
        ]),
        vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), bytes).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1usize..20).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        any::<Index>().prop_map(Mutation::DropLine),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

/// Applies `mutations` to `body` (never to the fixed state dir line in front of it).
fn mutate(body: &str, mutations: &[Mutation]) -> Vec<u8> {
    let mut b = body.as_bytes().to_vec();
    for m in mutations {
        let mut lines: Vec<Vec<u8>> = b.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
        match m {
            Mutation::Set(i, v) if !b.is_empty() => {
                let at = i.index(b.len());
                b[at] = *v;
            }
            Mutation::Insert(i, v) => {
                let tail = b.split_off(i.index(b.len() + 1));
                b.extend_from_slice(v);
                b.extend(tail);
            }
            Mutation::Delete(i, n) if !b.is_empty() => {
                let at = i.index(b.len());
                b.drain(at..(at + n).min(b.len()));
            }
            Mutation::DuplicateLine(i) => {
                let line = lines[i.index(lines.len())].clone();
                lines.insert(i.index(lines.len()), line);
                b = lines.join(&b'\n');
            }
            Mutation::SwapLines(x, y) => {
                let (x, y) = (x.index(lines.len()), y.index(lines.len()));
                lines.swap(x, y);
                b = lines.join(&b'\n');
            }
            Mutation::DropLine(i) => {
                lines.remove(i.index(lines.len()));
                b = lines.join(&b'\n');
            }
            Mutation::Truncate(i) => b.truncate(i.index(b.len() + 1)),
            Mutation::Set(..) | Mutation::Delete(..) => {}
        }
    }
    let mut text = STATE_LINE.as_bytes().to_vec();
    text.extend_from_slice(&b);
    text
}

#[test]
fn config_load_survives_mutated_configs() {
    let host = Host::new();
    let body = host.config_toml(true)[STATE_LINE.len()..].to_string();
    check(384, vec(mutation(), 1..6), |ms| {
        if let Ok(c) = host.load(&mutate(&body, &ms)) {
            documented_rules(&c)?;
            prop_assert_eq!(&c.state_dir, &host.root.join("cfg/state"));
        }
        Ok(())
    });
}

/// A config value as written, and whether the documented rules make it valid.
type Field = (String, bool);

fn field(valid: BoxedStrategy<String>, invalid: BoxedStrategy<String>) -> BoxedStrategy<Field> {
    prop_oneof![
        valid.prop_map(|v| (v, true)),
        invalid.prop_map(|v| (v, false)),
    ]
    .boxed()
}

fn valid_host_id() -> BoxedStrategy<String> {
    prop_oneof!["[A-Za-z0-9][A-Za-z0-9._-]{0,62}", "[a-z]{63}"].boxed()
}

fn valid_coordinator() -> BoxedStrategy<String> {
    let host = prop_oneof![
        "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,20}){0,3}",
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        Just("[::1]".to_string()),
    ];
    (
        host,
        proptest::option::of(1u16..=u16::MAX),
        select(vec!["", "/"]),
    )
        .prop_map(|(h, port, slash)| match port {
            Some(p) => format!("https://{h}:{p}{slash}"),
            None => format!("https://{h}{slash}"),
        })
        .boxed()
}

fn coordinator_field() -> BoxedStrategy<Field> {
    prop_oneof![
        valid_coordinator().prop_map(|v| (v, true)),
        mutated(valid_coordinator()).prop_map(|v| (v, false)),
        select(vec![
            "http://127.0.0.1:7443",
            "HTTPS://x",
            "https://",
            "https://:1",
            "https://host:99999",
            "https://user:pw@host",
            "https://a b",
            " https://x",
            "grpc://x",
            "https:/x",
            "",
        ])
        .prop_map(|v| (v.to_string(), false)),
        noise().prop_map(|v| (v, false)),
    ]
    .boxed()
}

fn valid_label_part() -> BoxedStrategy<String> {
    prop_oneof!["[A-Za-z0-9._/-]{1,30}", "[a-z]{128}"].boxed()
}

/// Labels as written (duplicates allowed, TOML refuses them) and whether all are valid.
fn labels_field() -> BoxedStrategy<(Vec<(String, String)>, bool)> {
    let valid = proptest::collection::btree_map(
        valid_label_part().prop_filter("host is reserved", |k| k != "host"),
        valid_label_part(),
        0..4,
    )
    .prop_map(|m| (m.into_iter().collect::<Vec<_>>(), true));
    let part = || {
        prop_oneof![
            valid_label_part(),
            fuzz(valid_label_part(), "abz09._/-", 140),
            Just("host".to_string()),
            Just("x".repeat(129)),
        ]
    };
    let any_labels = vec((part(), part()), 0..4).prop_map(|l| {
        let ok = l
            .iter()
            .all(|(k, v)| label_part_ok(k) && label_part_ok(v) && k != "host")
            && l.iter()
                .map(|(k, _)| k)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == l.len();
        (l, ok)
    });
    let one_bad = (valid.clone(), part(), part()).prop_map(|((mut l, _), k, v)| {
        l.retain(|(key, _)| *key != k);
        let ok = label_part_ok(&k) && label_part_ok(&v) && k != "host";
        l.push((k, v));
        (l, ok)
    });
    prop_oneof![valid, one_bad, any_labels].boxed()
}

/// A reconnect setting: absent, an integer, or something else TOML may or may not take.
#[derive(Debug, Clone)]
enum Millis {
    Absent,
    Int(i64),
    Raw(&'static str),
}

fn millis() -> impl Strategy<Value = Millis> {
    prop_oneof![
        1 => Just(Millis::Absent),
        4 => prop_oneof![1i64..=100_000, any::<i64>(), Just(0), Just(-1), Just(i64::MAX)]
            .prop_map(Millis::Int),
        1 => select(vec!["1.5", "\"100\"", "true", "0x10", "1_000", "-0", "+7", "[]", "nan", "1e3"])
            .prop_map(Millis::Raw),
    ]
}

/// The value `Config` ends up with, when that is known.
fn millis_value(m: &Millis, default: u64) -> Option<u64> {
    match m {
        Millis::Absent => Some(default),
        Millis::Int(n) => u64::try_from(*n).ok(),
        Millis::Raw(_) => None,
    }
}

#[derive(Debug, Clone)]
struct Doc {
    host_id: Field,
    coordinator: Field,
    /// Written as `coordinators = [URL]` rather than `coordinator = URL` (the same thing).
    as_list: bool,
    labels: (Vec<(String, String)>, bool),
    initial: Millis,
    max: Millis,
}

/// Any doc: every field drawn independently, or a valid doc with one field from another.
fn docs() -> impl Strategy<Value = Doc> {
    prop_oneof![
        any_docs(),
        (valid_docs(), any_docs(), 0..5).prop_map(|(mut d, other, field)| {
            match field {
                0 => d.host_id = other.host_id,
                1 => (d.coordinator, d.as_list) = (other.coordinator, other.as_list),
                2 => d.labels = other.labels,
                3 => d.initial = other.initial,
                _ => d.max = other.max,
            }
            d
        }),
    ]
}

fn any_docs() -> impl Strategy<Value = Doc> {
    (
        field(valid_host_id(), fuzz(valid_host_id(), "abz09._-", 70)),
        coordinator_field(),
        labels_field(),
        millis(),
        millis(),
        any::<bool>(),
    )
        .prop_map(
            |(host_id, coordinator, labels, initial, max, as_list)| Doc {
                host_id,
                coordinator,
                as_list,
                labels,
                initial,
                max,
            },
        )
}

/// Docs whose every field is valid by the documented rules.
fn valid_docs() -> impl Strategy<Value = Doc> {
    let labels = proptest::collection::btree_map(
        valid_label_part().prop_filter("host is reserved", |k| k != "host"),
        valid_label_part(),
        0..4,
    );
    let reconnect = prop_oneof![
        Just((Millis::Absent, Millis::Absent)),
        (1i64..=10_000).prop_map(|i| (Millis::Int(i), Millis::Absent)),
        (200i64..=i64::MAX).prop_map(|m| (Millis::Absent, Millis::Int(m))),
        (1i64..=100_000, 0i64..=1_000_000).prop_map(|(i, d)| (Millis::Int(i), Millis::Int(i + d))),
    ];
    (
        valid_host_id(),
        valid_coordinator(),
        labels,
        reconnect,
        any::<bool>(),
    )
        .prop_map(
            |(host_id, coordinator, labels, (initial, max), as_list)| Doc {
                host_id: (host_id, true),
                coordinator: (coordinator, true),
                as_list,
                labels: (labels.into_iter().collect(), true),
                initial,
                max,
            },
        )
}

impl Doc {
    fn render(&self, host: &Host, profile: bool) -> String {
        let mut t = String::from(STATE_LINE);
        t.push_str(&format!("host_id = {}\n", q(&self.host_id.0)));
        if self.as_list {
            t.push_str(&format!("coordinators = [{}]\n", q(&self.coordinator.0)));
        } else {
            t.push_str(&format!("coordinator = {}\n", q(&self.coordinator.0)));
        }
        for (key, m) in [
            ("reconnect_initial_ms", &self.initial),
            ("reconnect_max_ms", &self.max),
        ] {
            match m {
                Millis::Absent => {}
                Millis::Int(n) => t.push_str(&format!("{key} = {n}\n")),
                Millis::Raw(r) => t.push_str(&format!("{key} = {r}\n")),
            }
        }
        t.push_str("[labels]\n");
        for (k, v) in &self.labels.0 {
            t.push_str(&format!("{} = {}\n", q(k), q(v)));
        }
        t.push_str(&host.tls_toml());
        if profile {
            t.push_str(&host.profile_toml());
        }
        t
    }

    /// Whether every field is valid by the documented rules (so the file must load).
    fn valid(&self) -> bool {
        let initial = millis_value(&self.initial, 200);
        let max = millis_value(&self.max, 10_000);
        self.host_id.1
            && self.coordinator.1
            && self.labels.1
            && matches!((initial, max), (Some(i), Some(m)) if 0 < i && i <= m)
    }
}

#[test]
fn config_load_accepts_only_documented_values() {
    let host = Host::new();
    check(384, (docs(), any::<bool>()), |(doc, profile)| {
        match host.load(doc.render(&host, profile).as_bytes()) {
            Ok(c) => {
                documented_rules(&c)?;
                prop_assert_eq!(&c.host_id, &doc.host_id.0);
                let urls = c.coordinator_urls().map_err(|e| TestCaseError::fail(e.1))?;
                prop_assert_eq!(urls.len(), 1);
                prop_assert_eq!(&urls[0].url, &doc.coordinator.0);
                prop_assert_eq!(c.coordinators.is_some(), doc.as_list);
                let labels: BTreeMap<String, String> = doc.labels.0.iter().cloned().collect();
                prop_assert_eq!(&c.labels, &labels);
                if let Some(i) = millis_value(&doc.initial, 200) {
                    prop_assert_eq!(c.reconnect_initial_ms, i);
                }
                if let Some(m) = millis_value(&doc.max, 10_000) {
                    prop_assert_eq!(c.reconnect_max_ms, m);
                }
            }
            Err(e) => prop_assert!(!doc.valid(), "a valid config was refused: {e}"),
        }
        Ok(())
    });
}

#[test]
fn config_load_accepts_every_valid_config() {
    let host = Host::new();
    check(128, (valid_docs(), any::<bool>()), |(doc, profile)| {
        prop_assert!(doc.valid());
        if let Err(e) = host.load(doc.render(&host, profile).as_bytes()) {
            prop_assert!(false, "{doc:?} refused: {e}");
        }
        Ok(())
    });
}

/// Keys `agent.toml` knows, per table (top level is "").
const KNOWN_KEYS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "host_id",
            "coordinator",
            "coordinators",
            "server_name",
            "labels",
            "state_dir",
            "tls",
            "reconnect_initial_ms",
            "reconnect_max_ms",
            "service",
            "app",
            "alembic",
            "postgres",
            "timeouts",
        ],
    ),
    ("tls", &["ca", "cert", "key"]),
    ("service", &["unit", "systemctl"]),
    (
        "app",
        &[
            "dir",
            "git",
            "env_file",
            "env_backup",
            "log_file",
            "health_base_url",
            "env_symlink_target",
        ],
    ),
    ("alembic", &["binary", "workdir", "config", "env"]),
    (
        "postgres",
        &[
            "pg_dump",
            "pg_restore",
            "host",
            "port",
            "user",
            "database",
            "backup_dir",
            "password_file",
        ],
    ),
    (
        "timeouts",
        &["default_secs", "max_secs", "kill_grace_secs", "actions"],
    ),
];

#[test]
fn config_load_refuses_unknown_keys() {
    let host = Host::new();
    let text = host.config_toml(true);
    let key = prop_oneof![
        "[a-z_]{1,20}",
        mutated(
            select(vec!["host_id", "coordinator", "unit", "dir", "host", "ca"])
                .prop_map(String::from)
                .boxed()
        ),
    ];
    check(256, (any::<Index>(), key), |(table, key)| {
        let (table, known) = KNOWN_KEYS[table.index(KNOWN_KEYS.len())];
        if known.contains(&key.as_str()) {
            return Ok(());
        }
        let line = format!("{} = 1\n", q(&key));
        let mutated = if table.is_empty() {
            text.replacen(STATE_LINE, &format!("{STATE_LINE}{line}"), 1)
        } else {
            let header = format!("[{table}]\n");
            prop_assert!(text.contains(&header));
            text.replacen(&header, &format!("{header}{line}"), 1)
        };
        let r = host.load(mutated.as_bytes());
        prop_assert!(r.is_err(), "unknown key {key:?} in [{table}] accepted");
        Ok(())
    });
}

#[test]
fn config_load_validates_the_profile() {
    let host = Host::new();
    let unit = fuzz(
        "[a-z][a-z0-9@_:-]{0,20}\\.service".boxed(),
        "abz09@._:-",
        40,
    );
    let secs = prop_oneof![Just(0u32), 1u32..=4000, any::<u32>()];
    let dir = prop_oneof![Just(q("app")), Just(host.path("app"))];
    check(
        128,
        (unit, secs.clone(), secs.clone(), secs, dir),
        |(unit, default_secs, max_secs, kill_grace_secs, dir)| {
            let text = host
                .config_toml(true)
                .replace("unit = \"app.service\"", &format!("unit = {}", q(&unit)))
                .replace(
                    "default_secs = 300",
                    &format!("default_secs = {default_secs}"),
                )
                .replace("max_secs = 3600", &format!("max_secs = {max_secs}"))
                .replace(
                    "kill_grace_secs = 5",
                    &format!("kill_grace_secs = {kill_grace_secs}"),
                )
                .replacen(
                    &format!("dir = {}", host.path("app")),
                    &format!("dir = {dir}"),
                    1,
                );
            if let Ok(c) = host.load(text.as_bytes()) {
                let t = &c.timeouts;
                prop_assert!(unit_ok(&unit), "unit {unit:?} accepted");
                prop_assert!(
                    0 < t.default_secs && t.default_secs <= t.max_secs,
                    "timeouts {t:?} accepted"
                );
                prop_assert!(
                    (1..=300).contains(&t.kill_grace_secs),
                    "timeouts {t:?} accepted"
                );
                prop_assert!(t.actions.values().all(|s| (1..=t.max_secs).contains(s)));
                let app = c.app.as_ref().expect("[app]");
                prop_assert!(app.dir.is_absolute(), "app.dir {:?} accepted", app.dir);
                prop_assert!(c.service.as_ref().is_none_or(|s| s.validate().is_ok()));
                prop_assert!(app.validate().is_ok());
                prop_assert!(c.alembic.as_ref().is_none_or(|a| a.validate().is_ok()));
                prop_assert!(c.postgres.as_ref().is_none_or(|p| p.validate().is_ok()));
            }
            Ok(())
        },
    );
}

#[test]
fn config_load_refuses_coordinators_without_host_or_with_a_bad_port() {
    let host = Host::new();
    for (bad, as_list) in ["https://:1", "https://host:99999", "https://:0"]
        .into_iter()
        .flat_map(|b| [(b, false), (b, true)])
    {
        let doc = Doc {
            host_id: ("web-1".into(), true),
            coordinator: (bad.into(), false),
            as_list,
            labels: (Vec::new(), true),
            initial: Millis::Absent,
            max: Millis::Absent,
        };
        assert!(
            host.load(doc.render(&host, false).as_bytes()).is_err(),
            "coordinator {bad:?} accepted"
        );
    }
}

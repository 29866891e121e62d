//! `cargo xtask bench [--quick]`: fleet-rollback measured against the bash bound, Ansible and
//! Salt on the same rollback (a), at scale with simulated agents (b), and at rest (c); the
//! results section of BENCHMARKS.md is regenerated from the measurements.
//!
//! The bench builds the release binaries (`cargo build --release --workspace --bins`) and then
//! runs as `target/release/xtask`, so the test support it reuses starts release binaries.
//! Everything runs on loopback; peers are installed into venvs under `target/bench/`.

mod fleet;
mod footprint;
mod guard_cost;
mod harness;
mod hosts;
mod peers;
mod report;
mod scale;
mod sys;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Fleet,
    Scale,
    Footprint,
    /// What the deployment guard costs the agents and the app.
    Guard,
}

/// Where part (b) keeps the coordinators' state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScaleStore {
    /// One coordinator on SQLite.
    Sqlite,
    /// One coordinator on PostgreSQL (a throwaway cluster under target/bench/postgres).
    Postgres,
    /// Two coordinators sharing that PostgreSQL, the agents spread over both.
    Cluster,
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// N = 10 and K = 1,000 only (under 5 minutes once the peers' venvs exist).
    #[arg(long)]
    quick: bool,
    /// Runs per figure; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these parts (default: all), e.g. `--only scale,footprint`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Part>,
    /// Host counts for part (a) instead of the default (10, 50, 100; quick: 10).
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<usize>,
    /// Agent counts for part (b) instead of the default (1000, 10000 and, on SQLite alone, the
    /// most up to 20,000 that the open-files limit allows; quick: 1000).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<usize>,
    /// Stores for part (b) (default: all): `sqlite`, `postgres` (one coordinator), `cluster`
    /// (two coordinators on one PostgreSQL). PostgreSQL needs root and postgresql-15.
    #[arg(long, value_delimiter = ',')]
    stores: Vec<ScaleStore>,
    /// Measure and print, but leave BENCHMARKS.md alone.
    #[arg(long)]
    no_write: bool,
    /// Part (a) without Ansible and Salt (about 15 of its 16 minutes at the default counts):
    /// fleet-rollback against the bash bounds only, for an A/B of a change. Implies --no-write.
    #[arg(long)]
    without_peers: bool,
    /// Profile the coordinator during each part (b) job with `perf record` into DIR (one
    /// `.data` file per run, and the simulator's in `…-simulator.data`). Profiling slows what
    /// it measures: implies --no-write.
    #[arg(long, value_name = "DIR")]
    perf: Option<std::path::PathBuf>,
    /// Measure nothing: re-render the results section from the measurements stored in it.
    #[arg(long)]
    render: bool,
    /// Set when the bench re-runs itself as the release build.
    #[arg(long, hide = true)]
    in_release: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let root = crate::workspace_root();
    if args.render {
        let md = root.join("BENCHMARKS.md");
        let text =
            std::fs::read_to_string(&md).with_context(|| format!("reading {}", md.display()))?;
        return report::write(&md, &report::load(&text));
    }
    let release = root.join("target").join("release");
    if !args.in_release {
        eprintln!("bench: cargo build --release --workspace --bins");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "--workspace", "--bins"])
            .status()
            .context("running cargo build --release")?;
        if !status.success() {
            bail!("cargo build --release --workspace --bins failed ({status})");
        }
        let mut forwarded: Vec<String> = std::env::args().skip_while(|a| a != "bench").collect();
        forwarded.push("--in-release".into());
        let status = Command::new(release.join("xtask"))
            .current_dir(&root)
            .args(&forwarded)
            .status()
            .context("starting target/release/xtask bench")?;
        if !status.success() {
            bail!("bench failed ({status})");
        }
        return Ok(());
    }
    measure(&args)
}

fn command_line(args: &BenchArgs) -> String {
    let mut c = String::from("cargo xtask bench");
    if args.quick {
        c.push_str(" --quick");
    }
    if args.runs != 3 {
        c.push_str(&format!(" --runs {}", args.runs));
    }
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    if !args.only.is_empty() {
        c.push_str(&format!(" --only {}", names(&args.only)));
    }
    if !args.hosts.is_empty() {
        c.push_str(&format!(" --hosts {}", list(&args.hosts)));
    }
    if !args.agents.is_empty() {
        c.push_str(&format!(" --agents {}", list(&args.agents)));
    }
    if !args.stores.is_empty() {
        c.push_str(&format!(" --stores {}", names(&args.stores)));
    }
    c
}

/// The values as they are spelled on the command line, comma-separated.
fn names<T: clap::ValueEnum>(values: &[T]) -> String {
    values
        .iter()
        .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
        .collect::<Vec<_>>()
        .join(",")
}

fn measure(args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let ws = crate::workspace_root();
    let root = ws.join("target").join("bench");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let runs = args.runs.max(1);
    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let hosts: Vec<usize> = match (args.hosts.is_empty(), args.quick) {
        (false, _) => args.hosts.clone(),
        (true, true) => vec![10],
        (true, false) => vec![10, 50, 100],
    };
    // Each K-agent run needs K descriptors in the coordinator and in the simulator: up to
    // the hard limit, which needs no privilege.
    let open_files = sys::raise_open_files_limit();
    let agents: Vec<usize> = match (args.agents.is_empty(), args.quick) {
        (false, _) => args.agents.clone(),
        (true, true) => vec![1000],
        (true, false) => {
            let mut ks = vec![1000, 10_000];
            ks.extend(scale::top_k(open_files));
            ks
        }
    };
    let commit =
        sys::run_ok(
            Command::new("git")
                .current_dir(&ws)
                .args(["rev-parse", "--short", "HEAD"]),
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let meta = json!({
        "date": sys::today_utc(),
        "machine": sys::machine(),
        "load": sys::load_average(),
        "commit": commit,
        "command": command_line(args),
    });
    eprintln!("bench: {meta}");
    let pki = harness::pki(&root.join("pki"))?;

    let bench_md = ws.join("BENCHMARKS.md");
    let mut data = report::load(&std::fs::read_to_string(&bench_md).unwrap_or_default());
    let merge = |data: &mut Value, path: &[&str], mut fig: Value| {
        if let (Some(obj), Some(m)) = (fig.as_object_mut(), meta.as_object()) {
            for (k, v) in m {
                obj.insert(k.clone(), v.clone());
            }
        }
        let mut at = data;
        for key in &path[..path.len() - 1] {
            if !at[*key].is_object() {
                at[*key] = json!({});
            }
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = fig;
    };
    data["versions"]["fleet_rollback"] = json!(format!(
        "{} (commit {commit}, release build)",
        peers::version_of(&harness::bin("rollback-agent"))
    ));

    let write = !args.no_write && args.perf.is_none() && !args.without_peers;
    let save = |data: &Value| -> Result<()> {
        if write {
            report::write(&bench_md, data)?;
        }
        Ok(())
    };

    if want(Part::Footprint) {
        let fig = footprint::measure(&root, &pki, Duration::from_secs(60))
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        eprintln!("bench: footprint: {fig}");
        merge(&mut data, &["footprint"], fig);
        save(&data)?;
    }
    if want(Part::Guard) {
        let fig = guard_cost::measure(
            &root,
            &pki,
            Duration::from_secs(120),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        eprintln!("bench: guard: {fig}");
        merge(&mut data, &["guard"], fig);
        save(&data)?;
    }
    if want(Part::Scale) {
        let stores = if args.stores.is_empty() {
            vec![
                ScaleStore::Sqlite,
                ScaleStore::Postgres,
                ScaleStore::Cluster,
            ]
        } else {
            args.stores.clone()
        };
        // One throwaway PostgreSQL for the part (a fresh database per run), stopped when
        // the part ends.
        let pg = if stores.iter().any(|s| *s != ScaleStore::Sqlite) {
            let dir = root.join("postgres");
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("bench: starting PostgreSQL 15 in {}", dir.display());
            Some(
                rollback_tests::pg::Cluster::start(&dir)
                    .context("starting the bench's PostgreSQL (needs root and postgresql-15)")?,
            )
        } else {
            None
        };
        for &k in &agents {
            for store in &stores {
                // The top scale is one coordinator's figure (RSS, connect, job): SQLite only.
                if args.agents.is_empty() && k > 10_000 && *store != ScaleStore::Sqlite {
                    continue;
                }
                let setup = match (store, &pg) {
                    (ScaleStore::Sqlite, _) => scale::Setup::Sqlite,
                    (ScaleStore::Postgres, Some(pg)) => scale::Setup::Postgres(&pg.server),
                    (ScaleStore::Cluster, Some(pg)) => scale::Setup::Cluster(&pg.server),
                    (_, None) => continue,
                };
                let fig = scale::measure(&root, &pki, k, runs, setup, args.perf.as_deref())
                    .unwrap_or_else(|e| {
                        eprintln!("bench: {} K={k}: {e:#}", setup.key());
                        json!({"error": format!("{e:#}")})
                    });
                merge(&mut data, &[setup.key(), &k.to_string()], fig);
                save(&data)?;
            }
        }
    }
    if want(Part::Fleet) {
        let mut peers = if args.without_peers {
            fleet::Peers::skipped("not measured: --without-peers")
        } else {
            fleet::Peers::install(&root)
        };
        let versions = peers.versions();
        if let Some(v) = versions.as_object() {
            for (k, x) in v {
                data["versions"][k] = x.clone();
            }
        }
        for &n in &hosts {
            let fig = fleet::measure(&root, &pki, &mut peers, n, runs).unwrap_or_else(|e| {
                eprintln!("bench: fleet N={n}: {e:#}");
                json!({"error": format!("{e:#}")})
            });
            merge(&mut data, &["fleet", &n.to_string()], fig);
            save(&data)?;
        }
    }
    eprintln!(
        "bench: done in {:.0} s{}",
        started.elapsed().as_secs_f64(),
        if !write {
            ""
        } else {
            "; BENCHMARKS.md updated"
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).bench
    }

    #[test]
    fn the_reproducing_command_names_every_option_that_changes_what_is_measured() {
        let args = [
            "--runs",
            "1",
            "--only",
            "scale,fleet",
            "--hosts",
            "100",
            "--agents",
            "1000,10000",
            "--stores",
            "sqlite,cluster",
        ];
        let line = command_line(&parse(&args));
        assert_eq!(
            line,
            "cargo xtask bench --runs 1 --only scale,fleet --hosts 100 --agents 1000,10000 --stores sqlite,cluster"
        );
        // What it prints parses back to the same measurement.
        let again: Vec<&str> = line.split(' ').skip(3).collect();
        assert_eq!(command_line(&parse(&again)), line);
        assert_eq!(
            command_line(&parse(&["--quick"])),
            "cargo xtask bench --quick"
        );
    }
}

//! Part (b), scale: K simulated agents (`rollback-agent --simulate K`, one process, each a full
//! agent with its own certificate and mTLS session whose steps are no-ops) against one
//! coordinator on SQLite, one on PostgreSQL, or two sharing one PostgreSQL (the agents spread
//! over both). Measures the time for all K to connect, a one-step job to all K, per-host
//! latencies from the job's events, and the coordinators' RSS and CPU time.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use super::harness::{self, Coordinator, Store};
use super::sys::{self, Daemon};

const RUNBOOK: &str = r#"# cargo xtask bench, part (b): one step; the simulated agents answer it with a no-op.
[procedures.noop]
description = "benchmark: one step on every host (a no-op in rollback-agent --simulate)"

[[procedures.noop.phases]]
name = "noop"
scope = "each"
steps = [{ action = "postgres.backup" }]
"#;

/// Where the simulated agents' journals live: tmpfs, standing in for K hosts' own disks (one
/// shared disk would serialize K hosts' fsyncs in the simulator, not in the coordinator).
const SIM_STATE_ROOT: &str = "/dev/shm/fleet-rollback-bench";

/// Reads the `agent online` lines appended to a coordinator's log since the last call: how
/// many there were, and which hosts they named. A host that lost its session and came back is
/// two lines but one host; counting lines let the connect wait end with agents still
/// reconnecting (19,631 of 19,700 online at round six's K = 19,700).
struct LogCounter {
    path: PathBuf,
    offset: u64,
    partial: String,
    count: usize,
    hosts: std::collections::HashSet<String>,
}

impl LogCounter {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            partial: String::new(),
            count: 0,
            hosts: std::collections::HashSet::new(),
        }
    }

    /// Lines containing `needle` so far (each line's `host=` field is kept in `hosts`).
    fn update(&mut self, needle: &str) -> Result<usize> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Ok(self.count);
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let complete = match self.partial.rfind('\n') {
            Some(i) => {
                let rest = self.partial.split_off(i + 1);
                std::mem::replace(&mut self.partial, rest)
            }
            None => return Ok(self.count),
        };
        for line in complete.lines().filter(|l| l.contains(needle)) {
            self.count += 1;
            if let Some(host) = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("host="))
            {
                self.hosts.insert(host.to_string());
            }
        }
        Ok(self.count)
    }
}

/// Hosts that came online on any of the coordinators.
fn distinct(online: &[LogCounter]) -> usize {
    online
        .iter()
        .flat_map(|n| n.hosts.iter())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Where a scale run keeps its state.
#[derive(Debug, Clone, Copy)]
pub enum Setup<'a> {
    /// One coordinator, SQLite (the part's original figure).
    Sqlite,
    /// One coordinator on a fresh database of this PostgreSQL server.
    Postgres(&'a rollback_tests::pg::Server),
    /// Two coordinators sharing a fresh database of this server; each agent is configured
    /// with both and the simulator spreads them (as real agents do by their host id).
    Cluster(&'a rollback_tests::pg::Server),
}

impl Setup<'_> {
    /// The key of its figures in the results (`scale`, `scale_pg`, `scale_cluster`).
    pub fn key(&self) -> &'static str {
        match self {
            Setup::Sqlite => "scale",
            Setup::Postgres(_) => "scale_pg",
            Setup::Cluster(_) => "scale_cluster",
        }
    }

    fn coordinators(&self) -> usize {
        match self {
            Setup::Cluster(_) => 2,
            _ => 1,
        }
    }
}

/// One run at K agents.
fn run_once(
    root: &Path,
    pki: &rollback_tests::support::Pki,
    k: usize,
    run: usize,
    setup: Setup<'_>,
    perf: Option<&Path>,
) -> Result<serde_json::Value> {
    let dir = root
        .join(format!("{}-{k}", setup.key()))
        .join(format!("run-{run}"));
    let runbook = root.join("scale-runbook.toml");
    std::fs::write(&runbook, RUNBOOK).context("writing scale runbook")?;
    // Labels that target hosts come from the coordinator's inventory.
    let inventory: String = (1..=k)
        .map(|i| format!("[inventory.\"sim-{i:05}\"]\nsim = \"yes\"\n"))
        .collect();
    let (store, database) = match setup {
        Setup::Sqlite => (Store::Sqlite, None),
        Setup::Postgres(server) | Setup::Cluster(server) => {
            let db = server.create_database()?;
            (
                Store::Postgres {
                    url: server.url(&db),
                    password_file: server.password_file.clone(),
                },
                Some((server, db)),
            )
        }
    };
    let mut coords = Vec::new();
    for i in 0..setup.coordinators() {
        let name = format!("bench-{}", char::from(b'a' + i as u8));
        coords.push(Coordinator::start_on(
            &dir.join(&name),
            pki,
            &runbook,
            &inventory,
            &store,
            &name,
        )?);
    }
    let cpids = coords
        .iter()
        .map(|c| c.daemon.pid())
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs(3));
    let rss_max = |pids: &[u32], f: &dyn Fn(u32) -> Result<u64>| -> Result<u64> {
        pids.iter()
            .map(|&p| f(p))
            .try_fold(0, |m, r| r.map(|v| m.max(v)))
    };
    let ticks = |pids: &[u32]| -> Result<u64> { pids.iter().map(|&p| sys::cpu_ticks(p)).sum() };
    let coord_idle0_kib = rss_max(&cpids, &sys::rss_kib)?;

    let state = PathBuf::from(SIM_STATE_ROOT).join(format!("{}-{k}-run-{run}", setup.key()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let template = dir.join("sim.toml");
    let urls: Vec<String> = coords.iter().map(|c| format!("\"{}\"", c.url)).collect();
    rollback_tests::support::write_private(
        &template,
        format!(
            "host_id = \"sim\"\ncoordinators = [{}]\nstate_dir = \"{}\"\n\
             [labels]\nsim = \"yes\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{ca}\"\nkey = \"{ca}\"\n\
             [postgres]\npg_dump = \"/bin/true\"\npg_restore = \"/bin/true\"\nhost = \"127.0.0.1\"\n\
             user = \"bench\"\ndatabase = \"bench\"\nbackup_dir = \"{}\"\n",
            urls.join(", "),
            state.display(),
            state.display(),
            ca = pki.ca().display(),
        ),
    )
    .context("writing simulator config")?;
    let mut cmd = Command::new(harness::bin("rollback-agent"));
    cmd.arg("--config")
        .arg(&template)
        .arg("--simulate")
        .arg(k.to_string())
        .arg("--simulate-pki")
        .arg(&pki.dir)
        .env("ROLLBACK_LOG", "warn,rollback_agent::simulate=info");
    let mut sim = Daemon::spawn(cmd, &dir.join("simulator.log"), "rollback-agent --simulate")?;
    let sim_log = sim.log.clone();
    let cert_wait = Instant::now();
    sys::wait_for(
        "simulated agents' certificates",
        Duration::from_secs(900),
        Duration::from_millis(10),
        || {
            sim.check_alive()?;
            Ok(std::fs::read_to_string(&sim_log)
                .unwrap_or_default()
                .contains("certificates ready")
                .then_some(()))
        },
    )?;
    let cert_secs = cert_wait.elapsed().as_secs_f64();
    let connect_start = Instant::now();
    let ticks0 = ticks(&cpids)?;
    let mut online: Vec<LogCounter> = coords
        .iter()
        .map(|c| LogCounter::new(&c.daemon.log))
        .collect();
    let mut held = vec![0; coords.len()];
    sys::wait_for(
        &format!("{k} simulated agents online"),
        Duration::from_secs(600),
        Duration::from_millis(10),
        || {
            sim.check_alive()?;
            for (i, (c, n)) in coords.iter_mut().zip(online.iter_mut()).enumerate() {
                c.daemon.check_alive()?;
                n.update("agent online")?;
                held[i] = n.hosts.len();
            }
            // A host may have come online on two coordinators (the cluster setup): the hosts
            // are counted once, and only once they could be enough.
            if held.iter().sum::<usize>() < k {
                return Ok(None);
            }
            Ok((distinct(&online) >= k).then_some(()))
        },
    )?;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let ticks1 = ticks(&cpids)?;
    std::thread::sleep(Duration::from_secs(5));
    let coord = &coords[0];
    // Sessions beyond one per host: an agent that lost its session while the others
    // connected, and came back.
    let reconnects = online.iter().map(|n| n.count).sum::<usize>() - distinct(&online);
    let listed = coord.online("sim=yes")?;
    if listed != k {
        bail!(
            "{listed} of {k} simulated agents listed online 5 s after all had come online ({reconnects} sessions beyond one per host while they connected)"
        );
    }
    let coord_idle_k_kib = rss_max(&cpids, &sys::rss_kib)?;
    let sim_pid = sim.pid()?;
    let sim_rss_kib = sys::rss_kib(sim_pid)?;
    let clk = sys::clk_tck() as f64;
    // What each side spends with nothing to do (10,000 sessions' heartbeats and keepalive
    // pings; the simulator's certificate watchers, one read per agent every 5 s): the job's
    // CPU less this rate over its wall time is what the job itself cost, a figure that does
    // not grow when a slower VM makes the job longer.
    let (idle_c0, idle_s0) = (ticks(&cpids)?, sys::cpu_ticks(sim_pid)?);
    std::thread::sleep(IDLE_WINDOW);
    let idle_rate = (ticks(&cpids)? - idle_c0) as f64 / clk / IDLE_WINDOW.as_secs_f64();
    let sim_idle_rate =
        (sys::cpu_ticks(sim_pid)? - idle_s0) as f64 / clk / IDLE_WINDOW.as_secs_f64();

    // The coordinators' profile, and the simulator's beside it (`…-simulator.data`).
    let profiles = match perf {
        Some(dir) => {
            let name = format!("{}-{k}-run{run}", setup.key());
            vec![
                Profile::start(dir, &name, &cpids)?,
                Profile::start(dir, &format!("{name}-simulator"), &[sim_pid])?,
            ]
        }
        None => Vec::new(),
    };
    let ticks2 = ticks(&cpids)?;
    let sim_ticks2 = sys::cpu_ticks(sim_pid)?;
    let (wall, job) = harness::rollback(
        coord,
        &[
            "--procedure",
            "noop",
            "--select",
            "sim=yes",
            "--reason",
            "cargo xtask bench: scale",
            "--yes",
            "--canary",
            "0",
            "--batch-size",
            "100%",
            "--max-failures",
            "100%",
        ],
        &dir.join("rollback"),
        Duration::from_secs(900),
    )?;
    let ticks3 = ticks(&cpids)?;
    let sim_ticks3 = sys::cpu_ticks(sim_pid)?;
    for p in profiles {
        p.finish()?;
    }
    let coord_peak_kib = rss_max(&cpids, &sys::peak_rss_kib)?;
    let hosts = job["hosts"].as_array().map_or(0, Vec::len);
    if hosts != k {
        bail!("the job covered {hosts} hosts, not {k}");
    }
    let job_id = job["job_id"].as_str().unwrap_or_default().to_string();
    let lat = latencies(coord, &job_id, &dir.join("watch"), k)?;

    sim.stop(Duration::from_secs(30));
    for c in &mut coords {
        c.daemon.stop(Duration::from_secs(30));
    }
    let _ = std::fs::remove_dir_all(&state);
    if let Some((server, db)) = database {
        server.drop_database(&db)?;
    }
    let job_cpu = (ticks3 - ticks2) as f64 / clk;
    let sim_job_cpu = (sim_ticks3 - sim_ticks2) as f64 / clk;
    let net = net_cpu(job_cpu, idle_rate, wall.as_secs_f64());
    Ok(json!({
        "coordinators": coords.len(),
        "held": held,
        "reconnects": reconnects,
        "certs_s": cert_secs,
        "connect_s": connect_secs,
        "connect_cpu_s": (ticks1 - ticks0) as f64 / clk,
        "job_wall_s": wall.as_secs_f64(),
        "job_coord_s": harness::job_seconds(&job),
        "job_cpu_s": job_cpu,
        // The figure that does not depend on the simulator sharing the two vCPUs.
        "job_cpu_per_1000_s": job_cpu * 1000.0 / k as f64,
        "sim_job_cpu_s": sim_job_cpu,
        "idle_cpu_per_s": idle_rate,
        "sim_idle_cpu_per_s": sim_idle_rate,
        "job_net_cpu_s": net,
        "job_net_cpu_per_1000_s": net * 1000.0 / k as f64,
        "sim_job_net_cpu_s": net_cpu(sim_job_cpu, sim_idle_rate, wall.as_secs_f64()),
        "coord_idle0_mib": coord_idle0_kib as f64 / 1024.0,
        "coord_idle_k_mib": coord_idle_k_kib as f64 / 1024.0,
        "coord_peak_mib": coord_peak_kib as f64 / 1024.0,
        "sim_rss_mib": sim_rss_kib as f64 / 1024.0,
        "latency": lat,
    }))
}

/// `perf record` of the coordinators, or of the simulator, during the job (`cargo xtask bench
/// --perf DIR`): call graphs by DWARF unwinding (release builds keep no frame pointers), 499
/// samples a second.
struct Profile {
    perf: Daemon,
    data: PathBuf,
}

impl Profile {
    fn start(dir: &Path, name: &str, pids: &[u32]) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let data = dir.join(format!("{name}.data"));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", "499", "--call-graph", "dwarf,32768", "-p"])
            .arg(pids.join(","))
            .arg("-o")
            .arg(&data);
        let mut perf = Daemon::spawn(cmd, &dir.join(format!("{name}.log")), "perf record")?;
        // perf prints nothing when it has attached; give it time to, and fail if it could not.
        std::thread::sleep(Duration::from_millis(500));
        perf.check_alive().context(
            "perf record (install linux-perf; it needs root or perf_event_paranoid <= 1)",
        )?;
        Ok(Self { perf, data })
    }

    fn finish(mut self) -> Result<()> {
        self.perf.interrupt();
        self.perf
            .wait_until(Instant::now() + Duration::from_secs(120));
        eprintln!(
            "bench: profile in {} (flame graph: see BENCHMARKS.md, \"Profiles\")",
            self.data.display()
        );
        Ok(())
    }
}

/// How long the idle rates of the coordinator and the simulator are measured, before the job.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// A job's CPU less what the process spends idle over the job's wall time (never below 0).
fn net_cpu(job_s: f64, idle_per_s: f64, wall_s: f64) -> f64 {
    (job_s - idle_per_s * wall_s).max(0.0)
}

/// Per-host latencies from the job's events (`rollbackctl --output json watch JOB`).
fn latencies(
    coord: &Coordinator,
    job_id: &str,
    scratch: &Path,
    k: usize,
) -> Result<serde_json::Value> {
    let mut start = None;
    let mut dispatched = std::collections::HashMap::new();
    let mut finished = std::collections::HashMap::new();
    for ev in harness::job_events(coord, job_id, scratch)? {
        match ev.kind.as_str() {
            "job.started" => start = Some(ev.at_ms),
            "host.dispatched" => {
                dispatched.insert(ev.host, ev.at_ms);
            }
            "step.finished" => {
                finished.insert(ev.host, ev.at_ms);
            }
            _ => {}
        }
    }
    let start = start.context("no job.started event")?;
    if finished.len() != k {
        bail!(
            "{} step results among the job's events, not {k}",
            finished.len()
        );
    }
    let to_result: Vec<f64> = finished.values().map(|&t| (t - start) as f64).collect();
    let to_dispatch: Vec<f64> = dispatched.values().map(|&t| (t - start) as f64).collect();
    let round_trip: Vec<f64> = finished
        .iter()
        .filter_map(|(h, &t)| dispatched.get(h).map(|&d| (t - d) as f64))
        .collect();
    Ok(json!({
        "result_p50_ms": sys::percentile(&to_result, 50.0),
        "result_p99_ms": sys::percentile(&to_result, 99.0),
        "dispatch_p50_ms": sys::percentile(&to_dispatch, 50.0),
        "dispatch_p99_ms": sys::percentile(&to_dispatch, 99.0),
        "rtt_p50_ms": sys::percentile(&round_trip, 50.0),
        "rtt_p99_ms": sys::percentile(&round_trip, 99.0),
    }))
}

/// Descriptors each process needs beside one per agent (the coordinator used 22 at 19,700).
const FD_HEADROOM: u64 = 256;

/// The scale above 10,000 in a default run: 20,000 agents, or the most (in hundreds) that
/// `limit` open files allow; none when that is under 15,000 (too close to 10,000 to add a
/// figure).
pub fn top_k(limit: Option<u64>) -> Option<usize> {
    let fits = limit.map_or(20_000, |l| l.saturating_sub(FD_HEADROOM) / 100 * 100);
    let k = usize::try_from(fits.min(20_000)).ok()?;
    (k >= 15_000).then_some(k)
}

/// All runs at K; the figure with each run and the medians.
pub fn measure(
    root: &Path,
    pki: &rollback_tests::support::Pki,
    k: usize,
    runs: usize,
    setup: Setup<'_>,
    perf: Option<&Path>,
) -> Result<serde_json::Value> {
    // The coordinator holds one descriptor per agent, and so does the simulator (its journals
    // open one file at a time); each needs a few dozen more of its own (listener, store,
    // epoll, logs).
    if let Some(limit) = sys::open_files_limit()
        && limit < (k as u64) + FD_HEADROOM
    {
        bail!(
            "the open-files limit is {limit} (the hard limit; raising it needs CAP_SYS_RESOURCE); {k} agents need at least {}: raise it (`ulimit -Hn {0}` as root) or measure at most {} agents",
            k as u64 + FD_HEADROOM,
            limit.saturating_sub(FD_HEADROOM)
        );
    }
    let mut all = Vec::new();
    for run in 1..=runs {
        let what = format!("{} K={k}", setup.key());
        eprintln!("bench: {what}: run {run}/{runs}");
        let r = run_once(root, pki, k, run, setup, perf)
            .with_context(|| format!("{what} run {run}"))?;
        eprintln!("bench: {what}: run {run}: {r}");
        all.push(r);
    }
    let med = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> serde_json::Value {
        let v: Vec<f64> = all.iter().filter_map(f).collect();
        json!(sys::median(&v))
    };
    Ok(json!({
        "k": k,
        "runs": all.clone(),
        "median": {
            "connect_s": med(&|r| r["connect_s"].as_f64()),
            "connect_cpu_s": med(&|r| r["connect_cpu_s"].as_f64()),
            "job_wall_s": med(&|r| r["job_wall_s"].as_f64()),
            "job_coord_s": med(&|r| r["job_coord_s"].as_f64()),
            "job_cpu_s": med(&|r| r["job_cpu_s"].as_f64()),
            "job_cpu_per_1000_s": med(&|r| r["job_cpu_per_1000_s"].as_f64()),
            "sim_job_cpu_s": med(&|r| r["sim_job_cpu_s"].as_f64()),
            "job_net_cpu_s": med(&|r| r["job_net_cpu_s"].as_f64()),
            "job_net_cpu_per_1000_s": med(&|r| r["job_net_cpu_per_1000_s"].as_f64()),
            "sim_job_net_cpu_s": med(&|r| r["sim_job_net_cpu_s"].as_f64()),
            "coord_idle0_mib": med(&|r| r["coord_idle0_mib"].as_f64()),
            "coord_idle_k_mib": med(&|r| r["coord_idle_k_mib"].as_f64()),
            "coord_peak_mib": med(&|r| r["coord_peak_mib"].as_f64()),
            "sim_rss_mib": med(&|r| r["sim_rss_mib"].as_f64()),
            "result_p50_ms": med(&|r| r["latency"]["result_p50_ms"].as_f64()),
            "result_p99_ms": med(&|r| r["latency"]["result_p99_ms"].as_f64()),
            "dispatch_p50_ms": med(&|r| r["latency"]["dispatch_p50_ms"].as_f64()),
            "dispatch_p99_ms": med(&|r| r["latency"]["dispatch_p99_ms"].as_f64()),
            "rtt_p50_ms": med(&|r| r["latency"]["rtt_p50_ms"].as_f64()),
            "rtt_p99_ms": med(&|r| r["latency"]["rtt_p99_ms"].as_f64()),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::{LogCounter, net_cpu, top_k};

    /// The idle rate over the job's wall time comes off its CPU, and never below nothing.
    #[test]
    fn a_jobs_net_cpu_leaves_out_what_the_process_spends_idle() {
        assert!((net_cpu(3.0, 0.25, 4.0) - 2.0).abs() < 1e-9);
        assert!((net_cpu(3.0, 0.0, 4.0) - 3.0).abs() < 1e-9);
        assert_eq!(net_cpu(0.5, 0.25, 4.0), 0.0);
    }

    /// A host that came online twice is one host; a line still being written is not read.
    #[test]
    fn the_connect_wait_counts_hosts_not_online_lines() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("coordinator.log");
        let mut f = std::fs::File::create(&log).expect("log");
        let mut n = LogCounter::new(&log);
        write!(
            f,
            "t INFO rollback_coordinator::gateway: agent online host=sim-00001 address=127.0.0.1:1\n\
             t INFO rollback_coordinator::gateway: agent reconnected; replacing its previous session host=sim-00001\n\
             t INFO rollback_coordinator::gateway: agent online host=sim-00001 address=127.0.0.1:2\n\
             t INFO rollback_coordinator::gateway: agent online host=sim-00002 addr"
        )
        .expect("write");
        assert_eq!(n.update("agent online").expect("read"), 2);
        assert_eq!(n.hosts.len(), 1);
        writeln!(f, "ess=127.0.0.1:3").expect("write");
        assert_eq!(n.update("agent online").expect("read"), 3);
        assert_eq!(n.hosts.len(), 2);
        assert_eq!(super::distinct(&[n]), 2);
    }

    #[test]
    fn the_top_scale_is_twenty_thousand_or_what_the_open_files_limit_allows() {
        assert_eq!(top_k(None), Some(20_000));
        assert_eq!(top_k(Some(1_048_576)), Some(20_000));
        assert_eq!(top_k(Some(20_256)), Some(20_000));
        // This VM: a hard limit of 20,000 leaves 19,744 for agents.
        assert_eq!(top_k(Some(20_000)), Some(19_700));
        assert_eq!(top_k(Some(15_256)), Some(15_000));
        assert_eq!(top_k(Some(15_255)), None);
        assert_eq!(top_k(Some(10_356)), None);
        assert_eq!(top_k(Some(1024)), None);
    }
}

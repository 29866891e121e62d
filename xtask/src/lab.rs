//! `cargo xtask lab up|status|down|exec|bench`: boot a fleet lab and leave it running, look at
//! it, run commands inside its hosts, tear it down, or time its boot. `lab up --coordinators
//! N` (2 or 3) also starts the product on it: N coordinators on one PostgreSQL store and an
//! agent in every host, so a user can see failover by hand.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rollback_tests::lab::{self, Lab, LabSpec};
use rollback_tests::lab_fleet::LabFleet;

#[derive(Args)]
pub struct LabArgs {
    #[command(subcommand)]
    cmd: LabCmd,
    /// Lab instance name (several labs can run side by side).
    #[arg(long, global = true, default_value = "dev", env = "ROLLBACK_LAB_NAME")]
    name: String,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Boot a lab (db host + app hosts + the sample app) and leave it running.
    Up {
        #[arg(long, default_value_t = 3)]
        app_hosts: usize,
        /// Hosts only: no database, no app.
        #[arg(long)]
        bare: bool,
        /// With 2 or 3: also start that many coordinators (a, b, c) sharing one PostgreSQL
        /// store in the coordinator namespace, and an agent in every host configured with all
        /// of them. 1 (the default): the lab alone.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        coordinators: u8,
    },
    /// Show the lab's hosts, their systemd and app state.
    Status,
    /// Tear the lab down (also removes a stale one).
    Down,
    /// Run a command inside a host (`coordinator` runs it in the coordinator's namespace).
    Exec {
        host: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Time boots of a lab (wall clock from nothing to every app /readyz = 200), tearing
    /// each down; prints every run and the median.
    Bench {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 3)]
        app_hosts: usize,
    },
}

pub fn run(args: LabArgs) -> Result<()> {
    match args.cmd {
        LabCmd::Up {
            app_hosts,
            bare,
            coordinators,
        } => up(&args.name, app_hosts, bare, usize::from(coordinators)),
        LabCmd::Status => status(&args.name),
        LabCmd::Down => down(&args.name),
        LabCmd::Exec { host, command } => match exec(&args.name, &host, &command)? {
            0 => Ok(()),
            code => std::process::exit(code),
        },
        LabCmd::Bench { runs, app_hosts } => bench(runs, app_hosts),
    }
}

/// The lab spec, after making sure the machine can boot it and the venv is installed.
fn spec(name: &str, app_hosts: usize, bare: bool) -> Result<LabSpec> {
    lab::check_prerequisites().map_err(anyhow::Error::msg)?;
    if !bare {
        crate::venv::ensure()?;
    }
    let spec = LabSpec::new(name).app_hosts(app_hosts);
    Ok(if bare { spec.bare() } else { spec })
}

fn up(name: &str, app_hosts: usize, bare: bool, coordinators: usize) -> Result<()> {
    if lab::known_labs().iter().any(|l| l == name) {
        bail!(
            "lab {name} is already up (or left by a killed run): `cargo xtask lab down --name {name}` first, or pick another --name"
        );
    }
    if coordinators > 1 {
        if bare {
            bail!("--coordinators {coordinators} runs agents for the sample app: leave out --bare");
        }
        crate::demo::build_binaries("cargo xtask lab up")?;
    }
    let spec = spec(name, app_hosts, bare)?;
    let started = Instant::now();
    let lab = Lab::boot(spec)?;
    eprintln!(
        "lab {name} is up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    print_status(&lab)?;
    if coordinators > 1 {
        let fleet = LabFleet::start_cluster(&lab, coordinators)
            .with_context(|| format!("lab {name}: starting {coordinators} coordinators"))?;
        print_cluster(name, &fleet);
        fleet.keep_running();
    }
    eprintln!("poke at it: cargo xtask lab exec HOST -- CMD...   tear down: cargo xtask lab down");
    lab.keep_running();
    Ok(())
}

/// What a user needs to see failover by hand: each coordinator, how to reach it, how to kill
/// one, and where the agents are.
fn print_cluster(lab_name: &str, fleet: &LabFleet) {
    let exec = format!(
        "cargo xtask lab exec --name {lab_name} {}",
        lab::COORDINATOR
    );
    let ctl_as = |who: &rollback_tests::support::CertFiles, url: &str| {
        format!(
            "{exec} {} --coordinator {url} --ca {} --cert {} --key {}",
            rollback_tests::support::bin("rollbackctl").display(),
            fleet.pki.ca().display(),
            who.cert.display(),
            who.key.display()
        )
    };
    let ctl = |url: &str| ctl_as(&fleet.operator, url);
    println!(
        "\n{} coordinators on one PostgreSQL store (postgres://{}@127.0.0.1:{}/{} in the coordinator namespace; files in {}):",
        fleet.coordinator_count(),
        rollback_tests::pg::USER,
        rollback_tests::pg::LAB_PORT,
        rollback_tests::lab_fleet::CLUSTER_DB,
        fleet.dir.display()
    );
    for i in 0..fleet.coordinator_count() {
        let name = fleet.coordinator_name(i).unwrap_or("?");
        let url = fleet.coordinator_url(i).unwrap_or_default();
        let pid = fleet
            .coordinator_pid(i)
            .map_or_else(|| "not running".to_string(), |p| format!("pid {p}"));
        println!("  coordinator {name}  {url}  {pid}");
        println!("    rollbackctl against {name}:  {} agents", ctl(url));
        if let Some(p) = fleet.coordinator_pid(i) {
            println!("    kill {name} (no shutdown at all):  kill -9 {p}");
        }
        if let Some(config) = fleet.coordinator_config(i) {
            println!(
                "    start {name} again:  {exec} {} --config {}",
                rollback_tests::support::bin("rollback-coordinator").display(),
                config.display()
            );
        }
    }
    let first = fleet.coordinator_url(0).unwrap_or_default();
    println!(
        "  the coordinators and their agents:  {} coordinators",
        ctl(first)
    );
    println!(
        "  a database rollback (it downgrades the schema one revision) to see taken over: kill its coordinator during the downgrade:  {} rollback --select role=web --procedure database --reason demo",
        ctl(first)
    );
    println!(
        "  it waits for a second person, the approver `{}`:  {} approve JOB --reason agreed",
        rollback_tests::lab_fleet::APPROVER,
        ctl_as(&fleet.approver, first)
    );
    println!(
        "  follow it from another coordinator:  {} watch JOB",
        ctl(fleet.coordinator_url(1).unwrap_or(first))
    );
}

fn status(name: &str) -> Result<()> {
    let lab = Lab::attach(name)?;
    print_status(&lab)
}

fn print_status(lab: &Lab) -> Result<()> {
    println!(
        "lab {}  subnet {}  state {}",
        lab.name(),
        lab.subnet(),
        lab::STATE_ROOT
    );
    println!(
        "  {:<12} {:<15} netns {}",
        lab::COORDINATOR,
        lab.coordinator_addr(),
        lab.coordinator_netns()
    );
    for host in lab.hosts() {
        let systemd = match host.systemd_pid() {
            Some(pid) => lab
                .systemctl(host.id(), &["is-system-running"])
                .map(|o| {
                    format!(
                        "systemd pid {pid} {}",
                        String::from_utf8_lossy(&o.stdout).trim()
                    )
                })
                .unwrap_or_else(|e| format!("systemd pid {pid}: {e:#}")),
            None => "systemd not started".to_string(),
        };
        let app = if lab.app_deployed() && host.role() == lab::Role::App {
            match lab.readyz(host.id()) {
                Ok(r) => format!("  /readyz {} {}", r.status, r.body.trim()),
                Err(e) => format!("  /readyz: {e:#}"),
            }
        } else {
            String::new()
        };
        println!("  {:<12} {:<15} {systemd}{app}", host.id(), host.addr());
    }
    Ok(())
}

fn down(name: &str) -> Result<()> {
    if Lab::remove(name)? {
        eprintln!("lab {name} is down");
    } else {
        eprintln!("lab {name} was not up");
    }
    Ok(())
}

/// Runs the command with this terminal's stdio; returns its exit code.
fn exec(name: &str, host: &str, command: &[String]) -> Result<i32> {
    let lab = Lab::attach(name)?;
    let Some((program, args)) = command.split_first() else {
        bail!("no command given")
    };
    let mut cmd = if host == lab::COORDINATOR {
        lab.coordinator_command(program)
    } else {
        lab.command(host, program)?.into_command()
    };
    cmd.args(args);
    let status = cmd
        .status()
        .with_context(|| format!("host {host}: running {}", command.join(" ")))?;
    Ok(status.code().unwrap_or(1))
}

fn bench(runs: usize, app_hosts: usize) -> Result<()> {
    let mut times = Vec::new();
    for run in 1..=runs {
        let spec = spec("bench", app_hosts, false)?;
        let started = Instant::now();
        let mut lab = Lab::boot(spec)?;
        let took = started.elapsed();
        lab.teardown()?;
        eprintln!("run {run}: boot {:.2} s", took.as_secs_f64());
        times.push(took);
    }
    times.sort();
    let median = times
        .get(times.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO);
    println!(
        "fleet lab boot ({app_hosts} app hosts + db): median {:.2} s of {runs} runs",
        median.as_secs_f64()
    );
    Ok(())
}

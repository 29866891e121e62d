//! The fleet lab: real hosts (network namespaces + systemd) on one machine (issue #3).
//!
//! A lab is N app hosts (`app1`…) and a database host (`db`), each a network namespace on a
//! private bridge with its own systemd as PID 1 on a tmpfs overlay of `/`, plus a coordinator
//! namespace on the same bridge. Names, subnet, cgroups and state are per lab instance
//! (/run/rollback-lab/NAME), so labs can run in parallel and a stale one is removed at the
//! next start. [`Lab`] tears everything down on drop (also when a test panics).
//!
//! ```no_run
//! use rollback_tests::lab::{Lab, LabSpec};
//! let lab = Lab::boot(LabSpec::new("demo"))?;
//! let ready = lab.readyz("app1")?;
//! assert_eq!(ready.status, 200);
//! # anyhow::Ok(())
//! ```

mod app;
mod boot;
mod cgroup;
mod cmd;
mod enter;
mod fleet;
mod footprint;
mod host_ops;
pub mod net;
pub mod poll;
mod postgres;
mod prerequisites;
mod probe;
mod procfs;
mod rootfs;
mod scenarios;
mod spec;
mod state;
mod sys;
mod teardown;
mod venv;

/// Where the lab's shared directory is mounted inside every host.
pub const SHARED_MOUNT: &str = "/lab";

pub use app::{
    APP_DIR, APP_LOG, APP_PORT, APP_UNIT, APP_USER, APP_VENV, DEPLOYED_RELEASE, NEXT_RELEASE,
    RELEASES, Release, assets_dir, release,
};
pub(crate) use enter::netns_command;
pub use fleet::Lab;
pub use footprint::Footprint;
pub use host_ops::HostCommand;
pub use postgres::{APP_DB, PG_BIN, PG_DATA, PG_PORT, PG_UNIT};
pub use prerequisites::{REQUIRED_ENV, boot_or_skip, check as check_prerequisites, required};
pub use probe::HttpResponse;
pub use procfs::ProcRecord;
pub use scenarios::{BACKUP_DIR, Backup, Breakage, BreakageKind, NEXT_RELEASE_DIR};
pub use spec::{COORDINATOR, DB_HOST, LabSpec, STATE_ROOT};
pub use state::{Host, LabState, Role, known_labs};
pub use venv::{VENV_ENV, locate as locate_venv, workspace_root};

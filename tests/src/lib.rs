//! rollback-tests: support code shared by the integration suites and by `xtask`: locating the
//! built binaries, a throwaway PKI, running the coordinator, agents and `rollbackctl` as real
//! processes, the suites' PostgreSQL cluster, and the fleet lab of real hosts (network
//! namespaces + systemd), and where the Debian packages are built.

pub mod browser;
pub mod demo;
pub mod lab;
pub mod lab_fleet;
pub mod packages;
pub mod pg;
pub mod raw_tls;
pub mod support;

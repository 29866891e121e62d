//! Test support: binaries, PKI, coordinator, agents and rollbackctl as real processes.

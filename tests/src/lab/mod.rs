//! The fleet lab: real hosts (network namespaces + systemd) on one machine (issue #3).

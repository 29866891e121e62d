//! The lab network: a "fabric" namespace holding a bridge, and one namespace per node joined
//! to it by a veth pair. Nothing is added to the root namespace's network.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::cmd;

const BRIDGE: &str = "br0";

fn ip(args: &[&str]) -> Result<()> {
    cmd::run(Command::new("ip").args(args), None, cmd::DEFAULT_TIMEOUT).map(drop)
}

/// Path of a named network namespace's file.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Creates the fabric namespace and its bridge.
pub fn create_fabric(fabric: &str) -> Result<()> {
    ip(&["netns", "add", fabric]).with_context(|| format!("creating fabric namespace {fabric}"))?;
    ip(&["-n", fabric, "link", "set", "lo", "up"])?;
    ip(&["-n", fabric, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", fabric, "link", "set", BRIDGE, "up"])
}

/// Creates a node's namespace, wires it to the bridge and gives it `addr`/24 on `eth0`.
pub fn create_node(fabric: &str, node_id: &str, netns: &str, addr: Ipv4Addr) -> Result<()> {
    let port = format!("p-{node_id}");
    let cidr = format!("{addr}/24");
    (|| {
        ip(&["netns", "add", netns])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", fabric, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ])?;
        ip(&["-n", fabric, "link", "set", &port, "master", BRIDGE, "up"])?;
        ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])
    })()
    .with_context(|| format!("wiring {node_id} ({netns}, {cidr}) to the lab bridge"))
}

/// Deletes a network namespace; one that does not exist is fine.
pub fn delete_netns(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", name]).with_context(|| format!("deleting network namespace {name}"))
}

/// Network namespaces whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

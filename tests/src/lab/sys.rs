//! The lab's only raw system calls: signalling a process, and moving a child into the host's
//! private cgroups (plus a new session) between fork and exec.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// Sends SIGKILL to `pid`. A process that is already gone is not an error.
pub fn kill_hard(pid: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Makes the child of `cmd`, before it execs, join each cgroup whose `cgroup.procs` file is
/// listed (writing "0" moves the writing process), then start a new session so it outlives a
/// terminal's Ctrl-C.
pub fn join_cgroups_and_setsid(cmd: &mut Command, procs_files: &[PathBuf]) -> io::Result<()> {
    let files = procs_files
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: the hook runs between fork and exec; it only calls async-signal-safe functions
    // (open, write, close, setsid) on memory prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for file in &files {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

//! The few operating-system calls the local backend needs that std does not offer. The
//! only `unsafe` of the crate is here, each use explained.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// A signal the backend sends to a node's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Ask to stop.
    Terminate,
    /// Stop now.
    Kill,
    /// Freeze (the process keeps its sockets but answers nothing).
    Stop,
    /// Thaw after [`Signal::Stop`].
    Continue,
}

impl Signal {
    const fn number(self) -> libc::c_int {
        match self {
            Self::Terminate => libc::SIGTERM,
            Self::Kill => libc::SIGKILL,
            Self::Stop => libc::SIGSTOP,
            Self::Continue => libc::SIGCONT,
        }
    }
}

/// Sends `signal` to process `pid`.
pub(crate) fn send(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal.number()) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped, does not count).
pub(crate) fn exists(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists; no memory is touched.
    let result = unsafe { libc::kill(raw, 0) };
    let present = result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    present && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}

/// Mounts a tmpfs of `size` bytes at `dir`, readable by its owner only.
pub(crate) fn mount_tmpfs(dir: &std::path::Path, size: u64) -> std::io::Result<()> {
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let options = std::ffi::CString::new(format!("size={size},mode=0700")).map_err(std::io::Error::other)?;
    // SAFETY: every pointer is a NUL-terminated string that lives across the call; mount(2)
    // only reads them.
    let result = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if result == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Detaches the filesystem mounted at `dir` (lazily: a process still inside it keeps it
/// until it leaves).
pub(crate) fn unmount(dir: &std::path::Path) -> std::io::Result<()> {
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `target` is a NUL-terminated string that lives across the call.
    let result = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if result == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The effective user id.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Makes a child die with its runner, and enter a network namespace, before it runs.
///
/// The death signal is what keeps a crashed runner from leaking replicas: the kernel
/// sends SIGKILL to the child when the thread that spawned it ends. Children are spawned
/// from the runtime's long-lived threads (never from a blocking-pool thread, which would
/// end early and take its children with it).
pub(crate) fn prepare_child(command: &mut tokio::process::Command, netns: Option<File>) {
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, setns) on values it owns; it
    // allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The runner may have died between fork and prctl: then nobody will send
            // the signal, so give up now.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the runner exited while starting this process"));
            }
            if let Some(netns) = &netns
                && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

//! Dropping from root (or from the target ids) to an unprivileged, capability-free process.
//!
//! Everything here is plain system calls on caller-provided memory: [`drop_privileges`]
//! runs in a freshly forked child before `execve`, where allocating is not safe.

use nix::errno::Errno;

/// The ids a process drops to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    pub uid: u32,
    pub gid: u32,
    /// Exactly the supplementary groups to keep: empty for a numeric identity.
    pub groups: Vec<u32>,
}

/// The step of [`drop_privileges`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivilegeStep {
    /// The target uid, gid or a supplementary group is 0; the supervisor never runs a
    /// workload as root or in the root group.
    TargetIsRoot,
    SetGroups,
    SetGid,
    /// Dropping a capability from the bounding set (needs CAP_SETPCAP).
    BoundingSet,
    SetUid,
    AmbientCapabilities,
    /// Emptying the permitted, effective and inheritable sets.
    CapabilitySets,
    NoNewPrivs,
    /// A check afterwards found the real/effective/saved uid or gid not the target.
    VerifyIds,
    /// A check afterwards found the supplementary groups not the intended ones.
    VerifyGroups,
    /// setuid(0) succeeded after the drop.
    VerifyNoRoot,
    /// A check afterwards found a capability left in some set.
    VerifyCapabilities,
    VerifyNoNewPrivs,
}

impl PrivilegeStep {
    /// What the step does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            PrivilegeStep::TargetIsRoot => {
                "checking the target (uid, gid and groups must not be 0)"
            }
            PrivilegeStep::SetGroups => "setgroups",
            PrivilegeStep::SetGid => "setresgid",
            PrivilegeStep::BoundingSet => {
                "clearing the capability bounding set (needs CAP_SETPCAP)"
            }
            PrivilegeStep::SetUid => "setresuid",
            PrivilegeStep::AmbientCapabilities => "clearing the ambient capabilities",
            PrivilegeStep::CapabilitySets => {
                "emptying the permitted, effective and inheritable capabilities"
            }
            PrivilegeStep::NoNewPrivs => "setting no_new_privs",
            PrivilegeStep::VerifyIds => "checking the real, effective and saved ids",
            PrivilegeStep::VerifyGroups => "checking the supplementary groups",
            PrivilegeStep::VerifyNoRoot => "checking that setuid(0) fails",
            PrivilegeStep::VerifyCapabilities => "checking that every capability set is empty",
            PrivilegeStep::VerifyNoNewPrivs => "checking no_new_privs",
        }
    }
}

/// A failed step with its errno (`Errno::UnknownErrno` for a failed check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("dropping privileges failed {}: {}", step.describe(), if *errno == Errno::UnknownErrno { "the check failed" } else { errno.desc() })]
pub struct PrivilegeError {
    pub step: PrivilegeStep,
    pub errno: Errno,
}

/// How many supplementary groups the checks can read back (Linux allows 65536, but the
/// read-back buffer lives on the stack).
const MAX_GROUPS: usize = 256;

/// Drops to `target`: setgroups (exactly `target.groups`), setgid, clear the capability
/// bounding set, setuid — all skipped when the process already has the target uid —
/// then clears ambient, permitted, effective and inheritable capabilities, sets
/// PR_SET_NO_NEW_PRIVS, and checks the outcome: real, effective and saved uid are the
/// target; so are the three gids and the groups are exactly `target.groups` when they
/// were set here (else the effective gid is checked: an unprivileged process cannot
/// change its groups); setuid(0) fails; every capability set is empty; no_new_privs is on.
///
/// Allocation-free, so it may run between fork and exec.
pub fn drop_privileges(target: &Privileges) -> Result<(), PrivilegeError> {
    let fail = |step| move |errno| PrivilegeError { step, errno };
    if target.uid == 0 || target.gid == 0 || target.groups.contains(&0) {
        return Err(fail(PrivilegeStep::TargetIsRoot)(Errno::EINVAL));
    }
    if target.groups.len() > MAX_GROUPS {
        return Err(fail(PrivilegeStep::SetGroups)(Errno::E2BIG));
    }
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } != target.uid;
    if privileged {
        // SAFETY: the pointer and length describe target.groups.
        let rc = unsafe { libc::setgroups(target.groups.len(), target.groups.as_ptr()) };
        Errno::result(rc).map_err(fail(PrivilegeStep::SetGroups))?;
        // SAFETY: plain id syscalls.
        let rc = unsafe { libc::setresgid(target.gid, target.gid, target.gid) };
        Errno::result(rc).map_err(fail(PrivilegeStep::SetGid))?;
        // The bounding set can only shrink while CAP_SETPCAP is still effective: before setuid.
        clear_bounding_set().map_err(fail(PrivilegeStep::BoundingSet))?;
        // SAFETY: plain id syscalls.
        let rc = unsafe { libc::setresuid(target.uid, target.uid, target.uid) };
        Errno::result(rc).map_err(fail(PrivilegeStep::SetUid))?;
    } else {
        // Already the target uid: nothing privileged is attempted, but a bounding set
        // that is not empty still has to go (which fails without CAP_SETPCAP).
        clear_bounding_set().map_err(fail(PrivilegeStep::BoundingSet))?;
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    )
    .map_err(fail(PrivilegeStep::AmbientCapabilities))?;
    set_capabilities([CapData::default(); 2]).map_err(fail(PrivilegeStep::CapabilitySets))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map_err(fail(PrivilegeStep::NoNewPrivs))?;
    verify(target, privileged)
}

fn verify(target: &Privileges, groups_were_set: bool) -> Result<(), PrivilegeError> {
    let check = |ok: bool, step| {
        ok.then_some(()).ok_or(PrivilegeError {
            step,
            errno: Errno::UnknownErrno,
        })
    };
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the pointers are to locals.
    Errno::result(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }).map_err(|errno| {
        PrivilegeError {
            step: PrivilegeStep::VerifyIds,
            errno,
        }
    })?;
    check([r, e, s] == [target.uid; 3], PrivilegeStep::VerifyIds)?;
    // SAFETY: as above.
    Errno::result(unsafe { libc::getresgid(&mut r, &mut e, &mut s) }).map_err(|errno| {
        PrivilegeError {
            step: PrivilegeStep::VerifyIds,
            errno,
        }
    })?;
    if groups_were_set {
        check([r, e, s] == [target.gid; 3], PrivilegeStep::VerifyIds)?;
        let mut groups = [0 as libc::gid_t; MAX_GROUPS];
        // SAFETY: the buffer holds MAX_GROUPS entries.
        let n = unsafe { libc::getgroups(MAX_GROUPS as libc::c_int, groups.as_mut_ptr()) };
        // The kernel keeps groups sorted, so compare as sets of the same size.
        let read = &groups[..n.max(0) as usize];
        check(
            n >= 0
                && read.len() == target.groups.len()
                && read.iter().all(|g| target.groups.contains(g))
                && target.groups.iter().all(|g| read.contains(g)),
            PrivilegeStep::VerifyGroups,
        )?;
    } else {
        check(e == target.gid, PrivilegeStep::VerifyIds)?;
    }
    // SAFETY: plain id syscall; success would be the failure being checked for.
    check(unsafe { libc::setuid(0) } != 0, PrivilegeStep::VerifyNoRoot)?;
    let sets = get_capabilities().map_err(|errno| PrivilegeError {
        step: PrivilegeStep::VerifyCapabilities,
        errno,
    })?;
    check(
        sets == [CapData::default(); 2],
        PrivilegeStep::VerifyCapabilities,
    )?;
    for cap in 0..=last_capability() {
        let bounding = prctl(libc::PR_CAPBSET_READ, cap, 0);
        let ambient = prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
            cap,
        );
        check(
            bounding == Ok(0) && ambient == Ok(0),
            PrivilegeStep::VerifyCapabilities,
        )?;
    }
    check(
        prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0) == Ok(1),
        PrivilegeStep::VerifyNoNewPrivs,
    )
}

/// Drops every capability still in the bounding set.
fn clear_bounding_set() -> Result<(), Errno> {
    for cap in 0..=last_capability() {
        if prctl(libc::PR_CAPBSET_READ, cap, 0)? == 1 {
            prctl(libc::PR_CAPBSET_DROP, cap, 0)?;
        }
    }
    Ok(())
}

/// The highest capability number the running kernel knows: probed with PR_CAPBSET_READ,
/// which fails with EINVAL past the last one (no /proc read needed).
fn last_capability() -> libc::c_ulong {
    let mut cap: libc::c_ulong = 40;
    while cap < 63 && prctl(libc::PR_CAPBSET_READ, cap + 1, 0).is_ok() {
        cap += 1;
    }
    while cap > 0 && prctl(libc::PR_CAPBSET_READ, cap, 0).is_err() {
        cap -= 1;
    }
    cap
}

fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> Result<i32, Errno> {
    // SAFETY: the options used here take integer arguments only.
    Errno::result(unsafe {
        libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong)
    })
}

/// One 32-bit slice of the effective, permitted and inheritable sets (capget/capset ABI).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn set_capabilities(mut data: [CapData; 2]) -> Result<(), Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: header and two data slices, as version 3 requires.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_mut_ptr()) };
    Errno::result(rc).map(drop)
}

fn get_capabilities() -> Result<[CapData; 2], Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: as in set_capabilities.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    Errno::result(rc).map(|_| data)
}

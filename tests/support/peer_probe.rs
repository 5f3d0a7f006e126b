//! A raw connection to a server's unix socket as some uid: whether the socket's
//! permissions or the server's peer check refused it, or the server answered.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What a raw connection attempt as some uid got.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// connect() failed with EACCES (file permissions).
    ConnectDenied,
    /// Connected, sent the HTTP/2 preface, and the server closed the connection unread.
    Closed,
    /// The server answered the preface (with its HTTP/2 SETTINGS).
    Answered,
    Other(i32),
}

/// Forks a child that (when `uid` is given) drops to that uid and gid, connects to
/// `socket`, speaks the HTTP/2 client preface and reports what happened as its exit code.
/// Everything it needs is prepared before fork; the child makes only raw system calls.
pub fn probe(socket: &Path, uid: Option<u32>) -> Probe {
    // HTTP/2 client preface followed by an empty SETTINGS frame.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // SAFETY: sockaddr_un is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = socket.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (slot, byte) in addr.sun_path.iter_mut().zip(path) {
        *slot = *byte as libc::c_char;
    }
    let timeout = libc::timeval {
        tv_sec: 20,
        tv_usec: 0,
    };
    // SAFETY: the child runs only async-signal-safe system calls on memory prepared above
    // and leaves with _exit; the parent only waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(20);
                }
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(21);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                libc::_exit(if *libc::__errno_location() == libc::EACCES {
                    10
                } else {
                    22
                });
            }
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            if libc::send(
                fd,
                hello.as_ptr() as *const libc::c_void,
                hello.len(),
                libc::MSG_NOSIGNAL,
            ) < 0
            {
                libc::_exit(11);
            }
            let mut byte = 0u8;
            let n = libc::recv(fd, &mut byte as *mut u8 as *mut libc::c_void, 1, 0);
            libc::_exit(match n {
                1 => 12,
                0 => 11,
                _ if *libc::__errno_location() == libc::ECONNRESET => 11,
                _ => 23,
            });
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "the probe child died: {status}");
        match libc::WEXITSTATUS(status) {
            10 => Probe::ConnectDenied,
            11 => Probe::Closed,
            12 => Probe::Answered,
            other => Probe::Other(other),
        }
    }
}

/// nobody/nogroup on Debian: a uid other than the server's.
pub const OTHER_UID: u32 = 65534;

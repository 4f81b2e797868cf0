//! The few system calls PID 1 makes itself: the console, mounts, modules,
//! power.

use std::ffi::CString;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Print a line on the console, `cradle-agent: ` first.
///
/// The console is opened for each line, so a panic while printing cannot
/// leave a lock behind for the panic hook, which prints too. Nothing
/// secret is ever passed here. Unit tests print on stderr instead.
pub fn say(line: &str) {
    let line = format!("cradle-agent: {line}\n");
    if cfg!(test) {
        eprint!("{line}");
    } else if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = c.write_all(line.as_bytes());
    }
}

/// mount(2) `source` on `target` (made if missing) as `fstype`, with
/// `data` as the filesystem's options.
pub fn mount(source: &str, target: &str, fstype: &str, data: &str) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    let data = if data.is_empty() {
        std::ptr::null()
    } else {
        d.as_ptr().cast()
    };
    // SAFETY: NUL-terminated strings that outlive the call; the data is a
    // NUL-terminated option string or null.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, data) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// umount(2) `target`.
pub fn umount(target: &str) -> std::io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: a NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(t.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// finit_module(2) the module at `path`; one built in or loaded already is
/// fine.
pub fn load_module(path: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let params = cstr("")?;
    // SAFETY: finit_module(2) with an open descriptor and an empty
    // parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(e)
}

/// The virtio disks, `vda` first.
pub fn block_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Wait up to `limit` for `path` to exist (devices appear as drivers
/// probe them).
pub fn wait_for(path: &Path, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

pub fn cstr(s: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{s:?} holds a NUL byte"),
        )
    })
}

pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// Sync and power the VM off. Never returns: PID 1 must not exit.
pub fn power_off() -> ! {
    sync();
    // SAFETY: reboot(POWER_OFF) takes no pointer and does not return when
    // it succeeds.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
    say(&format!(
        "cannot power off: {}",
        std::io::Error::last_os_error()
    ));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

//! `cradle-agent`: the install appliance's `/init`, PID 1 of a throwaway VM.
//!
//! Built static (`cargo rustc -p cradle-agent --release -- -C
//! target-feature=+crt-static`), so the initramfs needs no C library. It
//! mounts the kernel's filesystems, loads the modules `cradle appliance
//! build` put in `/lib/modules` in the order of `/lib/modules/load.order`,
//! reports what it found on the console, and powers the VM off. As PID 1 it
//! must never return: the kernel would panic.
//!
//! Not yet: the communication NIC, the metadata service, running the
//! untrusted scripts and the personalization overlay (issue 8).

use std::ffi::CString;
use std::io::Write;

fn main() {
    let mut console = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/console")
        .ok();
    let mut say = |line: &str| {
        if let Some(c) = console.as_mut() {
            let _ = writeln!(c, "cradle-agent: {line}");
        }
    };
    say(&format!("started ({})", env!("CARGO_PKG_VERSION")));
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        if let Err(e) = mount(source, target, fstype) {
            say(&format!("cannot mount {target}: {e}"));
        }
    }
    let order = std::fs::read_to_string("/lib/modules/load.order").unwrap_or_default();
    let mut loaded = Vec::new();
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match load_module(&format!("/lib/modules/{name}.ko")) {
            Ok(()) => loaded.push(name.to_string()),
            Err(e) => say(&format!("cannot load module {name}: {e}")),
        }
    }
    say(&format!("modules loaded: {}", loaded.join(" ")));
    // Block devices show up as their drivers probe; give them a moment.
    let mut disks = Vec::new();
    for _ in 0..50 {
        disks = block_devices();
        if !disks.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    say(&format!("disks: {}", disks.join(" ")));
    say("powering off");
    power_off();
}

fn block_devices() -> Vec<String> {
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

fn mount(source: &str, target: &str, fstype: &str) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn load_module(path: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let params = cstr("");
    use std::os::fd::AsRawFd;
    // SAFETY: finit_module(2) with an open descriptor and an empty
    // parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    // Built in, or loaded already: fine.
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(e)
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a fixed string")
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot(POWER_OFF) does not
    // return when it succeeds.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // Should reboot fail, PID 1 must still not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

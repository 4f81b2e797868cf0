//! `cargo xtask ci`: the whole CI run, one step after another, failing fast.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{debian, run_cargo};

/// Debian packages the integration tests use: the real cloud-init (its
/// datasources read cradle) and botocore (its IMDS fetcher reads cradle's EC2
/// API), through Debian's Python; iproute2 and curl for the test that puts a
/// guest behind a router in network namespaces; genisoimage (isoinfo,
/// isovfy), xorriso, mtools, dosfstools (fsck.vfat) and util-linux (blkid) to
/// read config drives back; nftables and ping for the security-group tests,
/// which send real traffic between network namespaces; OpenSSH and rsync for
/// the remote-filesystem drivers; e2fsprogs and sfdisk for personalization
/// packages written into ext4 disk images.
const TEST_PACKAGES: &[&str] = &[
    "cloud-init",
    "python3-botocore",
    // Checks answers against docs/openapi.json's schemas.
    "python3-jsonschema",
    "iproute2",
    "curl",
    "genisoimage",
    "xorriso",
    "mtools",
    "dosfstools",
    "util-linux",
    "nftables",
    "iputils-ping",
    // `python3 -m venv` for the troveclient test, which pip-installs
    // python-troveclient from PyPI into a venv under the target dir, and
    // the identity tests (PyJWT and cryptography, the same way).
    "python3-venv",
    // The remote-filesystem tests start their own sshd on 127.0.0.1 and
    // drive ssh, scp, rsync and rrsync (shipped in Debian's rsync package).
    "openssh-server",
    "openssh-client",
    "rsync",
    // Personalization onto disk images: mke2fs, debugfs and e2fsck, and
    // sfdisk for the MBR and GPT images the tests make.
    "e2fsprogs",
    "fdisk",
    // The store tests, the cluster tests and `bench cluster` start their own
    // PostgreSQL server (initdb, pg_ctl, createdb, pg_dump).
    "postgresql",
    // The certificate for the HTTPS server that fetch must refuse; the
    // identity tests verify signed identity documents with openssl dgst,
    // smime and cms, as AWS's documentation does.
    "openssl",
    // DHCP for self-installing guests, one dnsmasq per job.
    "dnsmasq-base",
    // afterburn looks up the user whose ssh keys it writes with getpwnam;
    // nss_wrapper answers from a passwd file the test owns.
    "libnss-wrapper",
    // kill(1), which the personalization test uses to SIGKILL debugfs
    // halfway through an image write.
    "procps",
];
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

pub fn run() -> Result<()> {
    println!(
        "==> Debian packages for the tests: {}",
        TEST_PACKAGES.join(" ")
    );
    debian::ensure(
        TEST_PACKAGES,
        "the integration tests run cloud-init, botocore, PostgreSQL, ip, curl, nft, ping, sshd, scp, rsync, debugfs, sfdisk, nss_wrapper and the ISO and FAT tools",
    )?;
    println!("==> QEMU and Debian's kernel for the hypervisor tests");
    debian::ensure_with_qemu(
        &["qemu-utils", "linux-image-amd64"],
        "the hypervisor tests boot Debian's kernel under qemu-system-x86_64 and make qcow2 disks",
    )?;
    debian::ensure_kernel_downloadable()?;
    check_python()?;

    println!("==> cargo fmt --check");
    run_cargo(
        &["fmt", "--all", "--", "--check"],
        "the code is not formatted; run `cargo fmt --all`",
    )?;

    println!("==> cargo clippy -D warnings");
    run_cargo(
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        "clippy found problems (listed above)",
    )?;

    // The README's first command, exactly as a newcomer runs it.
    crate::readme::check()?;

    // The appliance's /init must be static (the initramfs has no C
    // library); the appliance test takes it from target/release. The
    // README names this step (`cargo xtask agent`).
    build_static_agent()?;

    // A peer a test runs, built once into a cache outside the checkout.
    crate::afterburn::ensure()?;
    // The Debian guest the agent's boot test bakes and boots.
    crate::guest_image::ensure(false)?;
    crate::dib::ensure()?;

    println!("==> cargo test");
    run_cargo(&["test", "--workspace"], "tests failed (listed above)")?;
    check_no_firewall_left()?;

    // The admin API against its OpenAPI document: a short pass, seeded so
    // that CI does the same each time (`cargo xtask fuzz-api` for more).
    crate::fuzz_api::run(&crate::fuzz_api::Options::ci())?;

    println!("==> ci passed");
    Ok(())
}

/// `cargo xtask agent`: the appliance's `/init`, static (its initramfs has
/// no C library), in target/release/cradle-agent, beside the release
/// `cradle`, where `cradle appliance build` looks for it. Only the agent
/// itself is linked with `+crt-static` (`cargo rustc` passes the flag to
/// the last crate alone), so its dependencies are the release build's own.
/// It is also the guest agent `cradle bake` writes into images, so its
/// debug info is stripped.
pub fn build_static_agent() -> Result<()> {
    println!("==> the static cradle-agent (cargo xtask agent)");
    run_cargo(
        &[
            "rustc",
            "-p",
            "cradle-agent",
            "--bin",
            "cradle-agent",
            "--release",
            "--",
            "-C",
            "target-feature=+crt-static",
            // It is baked into every guest image: no debug info.
            "-C",
            "strip=debuginfo",
        ],
        "cradle-agent would not build as a static binary",
    )?;
    println!(
        "    {}",
        crate::target_dir().join("release/cradle-agent").display()
    );
    Ok(())
}

/// Tests apply rulesets only inside network namespaces they make; one left
/// in the machine's own namespace means a test (or a serve it started)
/// touched the host's firewall.
fn check_no_firewall_left() -> Result<()> {
    println!("==> no cradle table left in the machine's own nftables ruleset");
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .context("cannot run nft list tables")?;
    let tables = String::from_utf8_lossy(&out.stdout);
    if tables.lines().any(|l| l.trim() == "table inet cradle") {
        bail!(
            "a test left `table inet cradle` in the machine's own namespace; \
             tests must apply rulesets only inside namespaces they make"
        );
    }
    Ok(())
}

/// Debian's Python must import the packages the tests drive.
fn check_python() -> Result<()> {
    let script = "import cloudinit, botocore, jsonschema";
    println!("    {DEBIAN_PYTHON} -c \"{script}\"");
    let out = Command::new(DEBIAN_PYTHON)
        .args(["-c", script])
        .env_remove("PYTHONPATH")
        .output()
        .with_context(|| format!("cannot run {DEBIAN_PYTHON} (Debian's python3)"))?;
    if !out.status.success() {
        bail!(
            "{DEBIAN_PYTHON} cannot import cloudinit, botocore and jsonschema ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

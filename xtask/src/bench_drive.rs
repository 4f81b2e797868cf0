//! `cargo xtask bench drive`: config drives built in-process by
//! `cradle-drive`, against genisoimage run the way Nova runs it.
//!
//! Nova writes the drive's tree to a temporary directory and runs
//! `genisoimage -o X -ldots -allow-lowercase -allow-multidot -l -publisher P
//! -quiet -J -r -V config-2 DIR`, one process per drive. Here genisoimage
//! gets the very trees cradle puts on its drives (`cradle_drive::tree`),
//! written out before the clock starts, and is timed from spawn to exit,
//! process start included, one drive after another. cradle is timed from
//! rendering the tree to the image file being written and closed. Both write
//! their images to files in the same temporary directory and neither syncs.
//!
//! Before anything is timed a few drives are built both ways and read back
//! with `isoinfo`: the Rock Ridge and Joliet listings of the two images must
//! be the same (and the tree's), so both build the same thing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::flags;
use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cradle_drive::{Format, LABEL, Limits};
use cradle_model::api::InstanceSpec;
use cradle_model::{Instance, RANDOM_SEED_LEN};
use time::OffsetDateTime;

use crate::bench::{guest_ip, median, ssh_key};
use crate::debian;

const GENISOIMAGE: &str = "/usr/bin/genisoimage";
const ISOINFO: &str = "/usr/bin/isoinfo";
/// `-publisher` for genisoimage: what cradle writes in the same field.
const PUBLISHER: &str = "cradle";
/// The issue's target: cradle's ISO drives/s over genisoimage's.
const TARGET_RATIO: f64 = 10.0;

pub struct Options {
    drives: usize,
    vfat_drives: usize,
    runs: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            drives: 1000,
            vfat_drives: 100,
            runs: 1,
        };
        for (flag, v) in flags::pairs(args)? {
            match flag {
                "--drives" => o.drives = flags::number(flag, v, 1)?,
                "--vfat-drives" => o.vfat_drives = flags::number(flag, v, 0)?,
                "--runs" => o.runs = flags::number(flag, v, 1)?,
                other => bail!("unknown option {other:?} (see `cargo xtask --help`)"),
            }
        }
        // The trees stay on disk for the whole run (about 30 files each), and
        // the metadata addresses come from `guest_ip`.
        if o.drives > 100_000 {
            bail!("--drives: at most 100000");
        }
        if o.vfat_drives > 10_000 {
            bail!("--vfat-drives: at most 10000");
        }
        Ok(o)
    }
}

/// A small deterministic generator (splitmix64) for seeds, ids and keys.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(n)
            .collect()
    }
}

/// About 1 KiB of cloud-config, as a real deployment would pass.
fn user_data(name: &str, fqdn: &str) -> String {
    let mut s = format!(
        "#cloud-config
hostname: {name}
fqdn: {fqdn}
manage_etc_hosts: true
package_update: true
packages:
  - nginx
  - chrony
  - jq
users:
  - default
  - name: deploy
    groups: [adm, sudo]
    shell: /bin/bash
    sudo: ALL=(ALL) NOPASSWD:ALL
write_files:
  - path: /etc/motd
    permissions: '0644'
    content: |
      {name}: provisioned from a cradle config drive.
  - path: /etc/nginx/conf.d/health.conf
    content: |
      server {{ listen 8080; location /health {{ return 200 ok; }} }}
runcmd:
  - [systemctl, enable, --now, nginx]
  - [systemctl, restart, chrony]
  - echo \"{name} ready\" > /var/tmp/ready
"
    );
    let mut n = 0;
    while s.len() < 1024 {
        n += 1;
        s.push_str(&format!("# note {n}: padding to a realistic size\n"));
    }
    s
}

/// Instance `k` of the benchmark: every kind of data a drive carries.
fn spec(k: usize) -> InstanceSpec {
    let ip = guest_ip(k);
    let [_, b, c, d] = ip.octets();
    let net = b - 1;
    let name = format!("drive-bench-{k:05}");
    let fqdn = format!("{name}.bench.example.org");
    let conf = format!(
        "# /etc/cradle/bench.conf\n[instance]\nname = {name}\nindex = {k}\n\
         [service]\nlisten = 0.0.0.0:8080\nworkers = 4\nlog_level = info\n"
    );
    InstanceSpec {
        name: name.clone(),
        hostname: Some(fqdn.clone()),
        user_data: Some(B64.encode(user_data(&name, &fqdn))),
        metadata: BTreeMap::from([
            ("role".to_string(), "web".to_string()),
            ("index".to_string(), k.to_string()),
            ("owner".to_string(), "team-cradle".to_string()),
        ]),
        public_keys: BTreeMap::from([
            (
                "default".to_string(),
                ssh_key(2 * k, &format!("admin@{name}")),
            ),
            (
                "deploy".to_string(),
                ssh_key(2 * k + 1, &format!("deploy@{name}")),
            ),
        ]),
        files: BTreeMap::from([("/etc/cradle/bench.conf".to_string(), B64.encode(conf))]),
        metadata_address: Some(ip.to_string()),
        local_ipv4: Some(format!("10.{net}.{c}.{d}/16")),
        gateway_ipv4: Some(format!("10.{net}.255.254")),
        dns_nameservers: vec!["10.0.0.2".to_string(), "10.0.0.3".to_string()],
        public_ipv4: Some(format!("198.51.100.{d}")),
        ..InstanceSpec::default()
    }
}

fn instances(n: usize, now: OffsetDateTime) -> Result<Vec<Instance>> {
    (0..n)
        .map(|k| {
            let mut mix = Mix(k as u64);
            let id_bytes: [u8; 16] = mix.bytes(16).try_into().expect("16 bytes");
            let id = uuid::Builder::from_random_bytes(id_bytes).into_uuid();
            spec(k)
                .into_instance(id, now, mix.bytes(RANDOM_SEED_LEN))
                .with_context(|| format!("instance {k} is invalid"))
        })
        .collect()
}

/// The drive's files under `dir`, as Nova writes them before genisoimage.
fn write_tree(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    for (path, bytes) in files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("a file has a parent"))?;
        std::fs::write(&file, bytes).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

/// One genisoimage process with Nova's arguments; output captured as Nova's
/// `processutils.execute` does.
fn genisoimage(out: &Path, dir: &Path) -> Result<()> {
    let o = Command::new(GENISOIMAGE)
        .arg("-o")
        .arg(out)
        .args([
            "-ldots",
            "-allow-lowercase",
            "-allow-multidot",
            "-l",
            "-publisher",
            PUBLISHER,
            "-quiet",
            "-J",
            "-r",
            "-V",
            LABEL,
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {GENISOIMAGE}"))?;
    if !o.status.success() {
        bail!(
            "genisoimage failed on {} ({}): {}",
            dir.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// cradle's drive of `inst` in `format`, written to `path` and closed.
fn cradle_drive(
    inst: &Instance,
    ctx: &cradle_render::Context<'_>,
    format: Format,
    path: &Path,
) -> Result<u64> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let n =
        cradle_drive::build(inst, ctx, format, Limits::default(), &mut out).with_context(|| {
            format!(
                "cannot build the {} drive of {}",
                format.as_str(),
                inst.name
            )
        })?;
    out.flush()?;
    Ok(n)
}

fn isoinfo(args: &[&str], img: &Path) -> Result<String> {
    let o = Command::new(ISOINFO)
        .args(args)
        .arg("-i")
        .arg(img)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {ISOINFO}"))?;
    if !o.status.success() {
        bail!(
            "isoinfo {} -i {} failed ({}): {}",
            args.join(" "),
            img.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Every path of an image as isoinfo lists it (`-R` or `-J`).
fn listing(img: &Path, extension: &str) -> Result<BTreeSet<String>> {
    Ok(isoinfo(&[extension, "-f"], img)?
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

fn volume_id(img: &Path) -> Result<String> {
    isoinfo(&["-d"], img)?
        .lines()
        .find_map(|l| l.strip_prefix("Volume id:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| anyhow!("isoinfo -d shows no volume id for {}", img.display()))
}

/// The files of a tree and the directories they imply, as `/a/b`.
fn tree_paths(files: &[(String, Vec<u8>)]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (path, _) in files {
        let mut prefix = String::new();
        for seg in path.split('/') {
            prefix.push('/');
            prefix.push_str(seg);
            all.insert(prefix.clone());
        }
    }
    all
}

/// Build drive `k` both ways and check the two images list the same paths.
fn check_same(
    k: usize,
    inst: &Instance,
    ctx: &cradle_render::Context<'_>,
    tree_dir: &Path,
    dir: &Path,
) -> Result<()> {
    let ours = dir.join(format!("cradle-{k:05}.iso"));
    let theirs = dir.join(format!("genisoimage-{k:05}.iso"));
    cradle_drive(inst, ctx, Format::Iso9660, &ours)?;
    genisoimage(&theirs, tree_dir)?;
    let expected = tree_paths(&cradle_drive::tree(inst, ctx));
    for ext in ["-R", "-J"] {
        let (a, b) = (listing(&ours, ext)?, listing(&theirs, ext)?);
        if a != b {
            bail!(
                "drive {k}: `isoinfo {ext} -f` differs between cradle and genisoimage\n\
                 only cradle's: {:?}\nonly genisoimage's: {:?}",
                a.difference(&b).collect::<Vec<_>>(),
                b.difference(&a).collect::<Vec<_>>()
            );
        }
        if a != expected {
            bail!(
                "drive {k}: `isoinfo {ext} -f` is not the tree: missing {:?}, extra {:?}",
                expected.difference(&a).collect::<Vec<_>>(),
                a.difference(&expected).collect::<Vec<_>>()
            );
        }
    }
    let (va, vb) = (volume_id(&ours)?, volume_id(&theirs)?);
    if va != LABEL || vb != LABEL {
        bail!("drive {k}: volume ids {va:?} (cradle) and {vb:?} (genisoimage), not {LABEL:?}");
    }
    println!(
        "    drive {k:05}: {} paths, same Rock Ridge and Joliet listings, volume id {LABEL} \
         ({} KiB cradle, {} KiB genisoimage)",
        expected.len(),
        std::fs::metadata(&ours)?.len() / 1024,
        std::fs::metadata(&theirs)?.len() / 1024,
    );
    Ok(())
}

/// One measurement: `drives` drives in `secs` seconds, `bytes` written.
#[derive(Clone, Copy)]
struct Measured {
    drives: usize,
    secs: f64,
    bytes: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.drives as f64 / self.secs
    }
}

/// cradle's ISO drives, one file each, all kept until the end as
/// genisoimage's are; timed from the first render to the last close.
fn cradle_iso_phase(
    insts: &[Instance],
    ctx: &cradle_render::Context<'_>,
    dir: &Path,
) -> Result<Measured> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = 0;
    let started = Instant::now();
    for (k, inst) in insts.iter().enumerate() {
        bytes += cradle_drive(inst, ctx, Format::Iso9660, &dir.join(format!("{k:05}.iso")))?;
    }
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok(Measured {
        drives: insts.len(),
        secs,
        bytes,
    })
}

/// genisoimage on each prepared tree, one process after another; timed from
/// the first spawn to the last exit.
fn genisoimage_phase(trees: &[PathBuf], dir: &Path) -> Result<Measured> {
    std::fs::create_dir_all(dir)?;
    let outs: Vec<PathBuf> = (0..trees.len())
        .map(|k| dir.join(format!("{k:05}.iso")))
        .collect();
    let started = Instant::now();
    for (tree, out) in trees.iter().zip(&outs) {
        genisoimage(out, tree)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut bytes = 0;
    for out in &outs {
        bytes += std::fs::metadata(out)?.len();
    }
    std::fs::remove_dir_all(dir)?;
    Ok(Measured {
        drives: trees.len(),
        secs,
        bytes,
    })
}

/// cradle's vfat drives (64 MiB each). Each file is removed once written so
/// that the disk never holds more than one; only building and writing it
/// (create to close) is timed.
fn vfat_phase(
    insts: &[Instance],
    ctx: &cradle_render::Context<'_>,
    n: usize,
    dir: &Path,
) -> Result<Measured> {
    std::fs::create_dir_all(dir)?;
    let mut timed = Duration::ZERO;
    let mut bytes = 0;
    for k in 0..n {
        let path = dir.join(format!("{k:05}.img"));
        let started = Instant::now();
        bytes += cradle_drive(&insts[k % insts.len()], ctx, Format::Vfat, &path)?;
        timed += started.elapsed();
        std::fs::remove_file(&path)?;
    }
    std::fs::remove_dir_all(dir)?;
    Ok(Measured {
        drives: n,
        secs: timed.as_secs_f64(),
        bytes,
    })
}

fn print_header() {
    println!(
        "{:<16} {:>7} {:>9} {:>10} {:>10}",
        "tool", "drives", "seconds", "drives/s", "KiB/drive"
    );
}

fn print_row(tool: &str, m: &Measured, rate: f64) {
    println!(
        "{:<16} {:>7} {:>9.3} {:>10.1} {:>10.0}",
        tool,
        m.drives,
        m.secs,
        rate,
        m.bytes as f64 / m.drives as f64 / 1024.0
    );
}

/// The median over runs: seconds and drives/s each the median of its own.
fn summary(runs: &[Measured]) -> (Measured, f64) {
    let m = Measured {
        drives: runs[0].drives,
        secs: median(runs.iter().map(|m| m.secs).collect()),
        bytes: runs[0].bytes,
    };
    (m, median(runs.iter().map(Measured::rate).collect()))
}

pub fn run(o: Options) -> Result<()> {
    println!("==> genisoimage (the peer) and isoinfo (the check)");
    if !Path::new(GENISOIMAGE).exists() || !Path::new(ISOINFO).exists() {
        debian::ensure(
            &["genisoimage"],
            "the benchmark compares cradle with genisoimage and reads drives with isoinfo",
        )?;
    }
    for tool in [GENISOIMAGE, ISOINFO] {
        if !Path::new(tool).exists() {
            bail!("{tool} is still missing after installing genisoimage");
        }
    }
    let version = Command::new(GENISOIMAGE)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("    {GENISOIMAGE}: {version}");

    let now = OffsetDateTime::now_utc().replace_nanosecond(0)?;
    let today = cradle_render::date(now);
    let vendor_data = serde_json::json!({});
    let ctx = cradle_render::Context::new(&today, &vendor_data);

    println!("==> make {} instances in-process", o.drives);
    let insts = instances(o.drives, now)?;
    let first = cradle_drive::tree(&insts[0], &ctx);
    println!(
        "    each drive: {} files, {} bytes of content (instance 0), user-data {} bytes, \
         {} keys, {} metadata items, {} injected file",
        first.len(),
        first.iter().map(|(_, b)| b.len()).sum::<usize>(),
        insts[0].user_data.as_ref().map_or(0, Vec::len),
        insts[0].public_keys.len(),
        insts[0].metadata.len(),
        insts[0].files.len(),
    );

    let tmp = tempfile::Builder::new()
        .prefix("cradle-bench-drive-")
        .tempdir()?;
    println!(
        "==> write the {} trees for genisoimage under {} (not timed)",
        o.drives,
        tmp.path().display()
    );
    let started = Instant::now();
    let trees: Vec<PathBuf> = (0..o.drives)
        .map(|k| tmp.path().join("trees").join(format!("{k:05}")))
        .collect();
    for (inst, dir) in insts.iter().zip(&trees) {
        write_tree(dir, &cradle_drive::tree(inst, &ctx))?;
    }
    println!("    {:.1} s", started.elapsed().as_secs_f64());

    println!("==> check: cradle and genisoimage build the same drives (isoinfo -R/-J -f)");
    let mut samples = vec![0, o.drives / 2, o.drives - 1];
    samples.dedup();
    let check_dir = tmp.path().join("check");
    std::fs::create_dir_all(&check_dir)?;
    for &k in &samples {
        check_same(k, &insts[k], &ctx, &trees[k], &check_dir)?;
    }
    std::fs::remove_dir_all(&check_dir)?;

    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!(
            "    load average before the runs: {} ({} CPUs)",
            l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }

    let (mut ours, mut theirs, mut vfat) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=o.runs {
        let run_dir = tmp.path().join(format!("run-{run}"));
        println!(
            "==> run {run}/{}: {} ISO drives each, then {} vfat drives",
            o.runs, o.drives, o.vfat_drives
        );
        print_header();
        let m = cradle_iso_phase(&insts, &ctx, &run_dir.join("cradle"))?;
        print_row("cradle iso9660", &m, m.rate());
        ours.push(m);
        let m = genisoimage_phase(&trees, &run_dir.join("genisoimage"))?;
        print_row("genisoimage", &m, m.rate());
        theirs.push(m);
        if o.vfat_drives > 0 {
            let m = vfat_phase(&insts, &ctx, o.vfat_drives, &run_dir.join("vfat"))?;
            print_row("cradle vfat", &m, m.rate());
            vfat.push(m);
        }
        std::fs::remove_dir_all(&run_dir).ok();
    }

    println!();
    println!(
        "==> results: {} ISO drives per tool, {} run(s){}",
        o.drives,
        o.runs,
        if o.runs > 1 { " (medians)" } else { "" }
    );
    println!("    one drive after another on one thread, each image written to a file;");
    println!("    cradle: from rendering the tree to closing the image file;");
    println!(
        "    genisoimage: from spawn to exit, one process per drive (trees written beforehand)"
    );
    print_header();
    let (ours, our_rate) = summary(&ours);
    let (theirs, their_rate) = summary(&theirs);
    print_row("cradle iso9660", &ours, our_rate);
    print_row("genisoimage", &theirs, their_rate);
    if !vfat.is_empty() {
        let (m, rate) = summary(&vfat);
        print_row("cradle vfat", &m, rate);
        println!(
            "    (vfat: {} MiB images, Nova's size; no genisoimage counterpart)",
            Limits::default().vfat_bytes >> 20
        );
    }
    let ratio = our_rate / their_rate;
    println!();
    println!("cradle/genisoimage ISO drives/s: {ratio:.1}x");
    println!();
    println!("target (from the issue; reported, not enforced):");
    println!(
        "  ISO drives/s >= {TARGET_RATIO}x genisoimage, its process start included: \
         {our_rate:.1} vs {their_rate:.1} drives/s = {ratio:.1}x -> {}",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_valid_and_realistic() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let insts = instances(3, now).unwrap();
        for inst in &insts {
            let ud = inst.user_data.as_ref().unwrap().len();
            assert!((1024..1200).contains(&ud), "user-data is {ud} bytes");
            assert_eq!(inst.public_keys.len(), 2);
            assert_eq!(inst.metadata.len(), 3);
            assert_eq!(inst.files.len(), 1);
            assert!(inst.local_ipv4.is_some() && inst.gateway_ipv4.is_some());
            assert_eq!(inst.dns_nameservers.len(), 2);
        }
        assert_ne!(insts[0].id, insts[1].id);
        // Deterministic: the same instance again.
        assert_eq!(instances(1, now).unwrap()[0].id, insts[0].id);
    }

    #[test]
    fn parses_options() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = Options::parse(&[]).unwrap();
        assert_eq!((o.drives, o.vfat_drives, o.runs), (1000, 100, 1));
        let o = Options::parse(&args("--drives 10 --runs 3 --vfat-drives 0")).unwrap();
        assert_eq!((o.drives, o.vfat_drives, o.runs), (10, 0, 3));
        assert!(Options::parse(&args("--drives 0")).is_err());
        assert!(Options::parse(&args("--runs")).is_err());
        assert!(Options::parse(&args("--bogus 1")).is_err());
    }
}

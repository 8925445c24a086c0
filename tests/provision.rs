//! Tests of `hw/provision-reserved-partition.sh` on disk images.
//!
//! Each test builds a sparse image file laid out as Raspberry Pi OS ships it:
//! an MBR, partition 1 FAT from 4 MiB, partition 2 ext4 filled with files up
//! to the end of the file. It runs the script on the image and checks the
//! result with sfdisk, blkid, e2fsck, dumpe2fs and debugfs on partitions copied
//! out of the image. When loop devices work and the tests run as root, the
//! reserved partition is also mounted read-only through a loop device.
//!
//! The tools come from fdisk, dosfstools, e2fsprogs and util-linux, which
//! `scripts/setup-host.sh` installs.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/hw/provision-reserved-partition.sh");
const LABEL: &str = "eventpi-reserved";
const SECTOR_BYTES: u64 = 512;
const MIB: u64 = 1024 * 1024;
const MIB_SECTORS: u64 = 2048;
const BOOT_START: u64 = 4 * MIB_SECTORS;
const BOOT_SECTORS: u64 = 48 * MIB_SECTORS;
const ROOT_START: u64 = BOOT_START + BOOT_SECTORS;
const DISK_ID: u32 = 0x5e3d_a1f0;

/// Returns a command for a program on PATH or in the sbin directories, where
/// Debian installs sfdisk and the e2fsprogs tools.
fn tool(program: &str) -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut command = Command::new(program);
    command.env("PATH", format!("{path}:/usr/sbin:/sbin"));
    command
}

/// Runs a command and panics with its output unless it exits with status 0.
fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|error| panic!("{command:?} did not start: {error}; install the tools with scripts/setup-host.sh"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn run_stdout(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout).expect("tool output is UTF-8")
}

/// Returns `length` deterministic bytes from an xorshift generator, so every
/// file has content that compresses badly and differs from the others.
fn pseudo_random_bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut bytes = Vec::with_capacity(length + 8);
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}

/// Copies `length` bytes from `source` at `source_offset` into `target` at
/// `target_offset`, skipping zero blocks so sparse files stay sparse.
fn copy_bytes(source: &Path, source_offset: u64, length: u64, target: &Path, target_offset: u64) {
    run(tool("dd")
        .arg(format!("if={}", source.display()))
        .arg(format!("of={}", target.display()))
        .arg(format!("skip={source_offset}"))
        .arg(format!("count={length}"))
        .arg(format!("seek={target_offset}"))
        .args(["bs=4M", "iflag=skip_bytes,count_bytes,fullblock", "oflag=seek_bytes", "conv=notrunc,sparse", "status=none"]));
}

/// Overwrites `length` bytes of `path` at `offset` with zeros.
fn zero_bytes(path: &Path, offset: u64, length: u64) {
    let mut file = fs::OpenOptions::new().write(true).open(path).expect("open file to zero");
    file.seek(SeekFrom::Start(offset)).expect("seek to the bytes to zero");
    io::copy(&mut io::repeat(0).take(length), &mut file).expect("write zeros");
}

fn set_file_size(path: &Path, bytes: u64) {
    let file = fs::OpenOptions::new().create(true).write(true).truncate(false).open(path).expect("open file to resize");
    file.set_len(bytes).expect("resize file");
}

fn sha256_file(path: &Path) -> String {
    let output = run_stdout(tool("sha256sum").arg("--").arg(path));
    output.split_whitespace().next().expect("sha256sum prints a digest").to_string()
}

/// Returns the SHA-256 of `sectors` sectors of `image` from sector `start`.
fn sha256_sectors(image: &Path, start: u64, sectors: u64) -> String {
    let mut file = File::open(image).expect("open image");
    file.seek(SeekFrom::Start(start * SECTOR_BYTES)).expect("seek in image");

    let mut child = tool("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start sha256sum");
    let mut stdin = child.stdin.take().expect("sha256sum stdin is piped");
    io::copy(&mut file.take(sectors * SECTOR_BYTES), &mut stdin).expect("feed sha256sum");
    drop(stdin);

    let output = child.wait_with_output().expect("wait for sha256sum");
    assert!(output.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&output.stdout).split_whitespace().next().expect("sha256sum prints a digest").to_string()
}

/// Entries of a directory tree by relative path: a file's SHA-256, a
/// symbolic link's target, or `dir` for a directory.
fn tree_manifest(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, directory: &Path, manifest: &mut BTreeMap<PathBuf, String>) {
        for entry in fs::read_dir(directory).expect("read directory") {
            let path = entry.expect("directory entry").path();
            let relative = path.strip_prefix(root).expect("entry below root").to_path_buf();
            let kind = fs::symlink_metadata(&path).expect("entry metadata").file_type();
            if kind.is_symlink() {
                let target = fs::read_link(&path).expect("read link");
                manifest.insert(relative, format!("link {}", target.display()));
            } else if kind.is_dir() {
                manifest.insert(relative, "dir".to_string());
                walk(root, &path, manifest);
            } else {
                manifest.insert(relative, sha256_file(&path));
            }
        }
    }

    let mut manifest = BTreeMap::new();
    walk(root, root, &mut manifest);
    manifest
}

fn directory_listing(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(directory).expect("read directory").map(|entry| entry.expect("directory entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// How a test image is built.
#[derive(Debug, Clone)]
struct Layout {
    image_bytes: u64,
    /// Size of partition 2; `None` runs it to the end of the image.
    root_sectors: Option<u64>,
    root_filesystem: &'static str,
    root_block_bytes: u32,
    /// Data in the root filesystem, written as files of 1 MiB.
    data_mib: u64,
}

impl Layout {
    fn new(image_mib: u64, data_mib: u64) -> Layout {
        Layout { image_bytes: image_mib * MIB, root_sectors: None, root_filesystem: "ext4", root_block_bytes: 4096, data_mib }
    }
}

/// A test image in a temporary directory of its own, with the tree its root
/// filesystem was made from.
struct Fixture {
    temporary_directory: tempfile::TempDir,
    directory: PathBuf,
    image: PathBuf,
    root_source: PathBuf,
    scratch: PathBuf,
}

impl Fixture {
    fn build(layout: &Layout) -> Fixture {
        let temporary = tempfile::Builder::new().prefix("provision-").tempdir().expect("create temporary directory");
        let directory = temporary.path().join("images");
        let scratch = temporary.path().join("scratch");
        let root_source = temporary.path().join("root-source");
        fs::create_dir_all(&directory).expect("create image directory");
        fs::create_dir_all(&scratch).expect("create scratch directory");
        let fixture = Fixture { temporary_directory: temporary, image: directory.join("raspios.img"), directory, root_source, scratch };

        fixture.write_root_source(layout.data_mib);
        let image_sectors = layout.image_bytes / SECTOR_BYTES;
        let root_sectors = layout.root_sectors.unwrap_or(image_sectors - ROOT_START);
        set_file_size(&fixture.image, layout.image_bytes);
        let table = format!(
            "label: dos\nlabel-id: {DISK_ID:#010x}\nunit: sectors\n\nstart={BOOT_START}, size={BOOT_SECTORS}, type=c\nstart={ROOT_START}, size={root_sectors}, type=83\n"
        );
        write_partition_table(&fixture.image, &table);

        let boot = fixture.scratch.join("boot.vfat");
        set_file_size(&boot, BOOT_SECTORS * SECTOR_BYTES);
        run(tool("mkfs.vfat").args(["-n", "bootfs"]).arg(&boot));
        copy_bytes(&boot, 0, BOOT_SECTORS * SECTOR_BYTES, &fixture.image, BOOT_START * SECTOR_BYTES);

        let root = fixture.scratch.join("root.fs");
        set_file_size(&root, root_sectors * SECTOR_BYTES);
        run(tool(&format!("mkfs.{}", layout.root_filesystem))
            .args(["-q", "-L", "rootfs", "-b", &layout.root_block_bytes.to_string(), "-d"])
            .arg(&fixture.root_source)
            .arg(&root));
        copy_bytes(&root, 0, root_sectors * SECTOR_BYTES, &fixture.image, ROOT_START * SECTOR_BYTES);

        fs::remove_file(&boot).expect("remove boot filesystem file");
        fs::remove_file(&root).expect("remove root filesystem file");
        fixture
    }

    /// Writes a small tree like a root filesystem's, with `data_mib` files of
    /// 1 MiB each, an empty file and a symbolic link.
    fn write_root_source(&self, data_mib: u64) {
        let data = self.root_source.join("home/pi/data");
        fs::create_dir_all(&data).expect("create data directory");
        fs::create_dir_all(self.root_source.join("etc")).expect("create etc");
        fs::create_dir_all(self.root_source.join("var/log")).expect("create var/log");

        fs::write(self.root_source.join("etc/hostname"), "eventpi-test\n").expect("write hostname");
        fs::write(self.root_source.join("etc/fstab"), "proc /proc proc defaults 0 0\n").expect("write fstab");
        fs::write(self.root_source.join("var/log/empty.log"), "").expect("write empty file");
        std::os::unix::fs::symlink("/usr/share/zoneinfo/UTC", self.root_source.join("etc/localtime")).expect("create symlink");
        for index in 0..data_mib {
            let bytes = pseudo_random_bytes(index, MIB as usize);
            fs::write(data.join(format!("block-{index:03}.bin")), bytes).expect("write data file");
        }
    }

    fn sha256(&self) -> String {
        sha256_file(&self.image)
    }

    fn provision(&self, arguments: &[&str]) -> Output {
        Command::new(SCRIPT).args(arguments).arg(&self.image).output().unwrap_or_else(|error| panic!("{SCRIPT} did not start: {error}"))
    }

    /// Copies a partition of the image into a file of its own in the scratch directory.
    fn extract(&self, partition: &Partition, name: &str) -> PathBuf {
        let target = self.scratch.join(name);
        set_file_size(&target, partition.size * SECTOR_BYTES);
        copy_bytes(&self.image, partition.start * SECTOR_BYTES, partition.size * SECTOR_BYTES, &target, 0);
        target
    }
}

/// Replaces the partition table of `image` with the one an sfdisk script describes.
fn write_partition_table(image: &Path, script: &str) {
    run_sfdisk_script(image, &[], script);
}

fn run_sfdisk_script(image: &Path, options: &[&str], script: &str) {
    let mut child = tool("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .args(options)
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sfdisk");
    child.stdin.take().expect("sfdisk stdin is piped").write_all(script.as_bytes()).expect("write sfdisk script");
    let output = child.wait_with_output().expect("wait for sfdisk");
    assert!(output.status.success(), "sfdisk rejected\n{script}\n{}", String::from_utf8_lossy(&output.stderr));
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition {
    number: u32,
    start: u64,
    size: u64,
    kind: String,
}

impl Partition {
    fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PartitionTable {
    label: String,
    id: String,
    partitions: Vec<Partition>,
}

fn read_partition_table(image: &Path) -> PartitionTable {
    let text = run_stdout(tool("sfdisk").arg("--json").arg(image));
    let json: serde_json::Value = serde_json::from_str(&text).expect("sfdisk --json prints JSON");
    let table = &json["partitiontable"];
    let partitions = table["partitions"]
        .as_array()
        .expect("partitions array")
        .iter()
        .map(|entry| {
            let node = entry["node"].as_str().expect("partition node");
            let digits: String = node.chars().rev().take_while(char::is_ascii_digit).collect();
            Partition {
                number: digits.chars().rev().collect::<String>().parse().expect("partition number"),
                start: entry["start"].as_u64().expect("partition start"),
                size: entry["size"].as_u64().expect("partition size"),
                kind: entry["type"].as_str().expect("partition type").to_string(),
            }
        })
        .collect();
    PartitionTable { label: table["label"].as_str().expect("label").to_string(), id: table["id"].as_str().expect("disk id").to_string(), partitions }
}

/// Returns a `Name: value` field from the superblock of an ext4 filesystem file.
fn superblock_field(filesystem: &Path, name: &str) -> String {
    let text = run_stdout(tool("dumpe2fs").arg("-h").arg(filesystem).stderr(Stdio::null()));
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .map(|value| value.trim().to_string())
        .unwrap_or_else(|| panic!("dumpe2fs -h shows no {name:?} for {}", filesystem.display()))
}

/// Lists the names in a directory of an ext4 filesystem file with debugfs.
fn ext4_directory_names(filesystem: &Path, directory: &str) -> Vec<String> {
    let text = run_stdout(tool("debugfs").args(["-R", &format!("ls -p {directory}")]).arg(filesystem).stderr(Stdio::null()));
    let mut names: Vec<String> = text.lines().filter_map(|line| line.split('/').nth(5).map(str::to_string)).filter(|name| !name.is_empty()).collect();
    names.sort();
    names
}

fn probe(image: &Path, partition: &Partition, tag: &str) -> String {
    let output = tool("blkid")
        .args(["-p", "-u", "filesystem", "-s", tag, "-o", "value"])
        .arg("-O")
        .arg((partition.start * SECTOR_BYTES).to_string())
        .arg("-S")
        .arg((partition.size * SECTOR_BYTES).to_string())
        .arg(image)
        .output()
        .expect("start blkid");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn loop_devices_work() -> bool {
    tool("losetup").arg("--find").output().map(|output| output.status.success()).unwrap_or(false)
}

/// Unmounts a test mount point when dropped, so a failed assert leaves no
/// mount (and, through autoclear, no loop device) behind.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = tool("umount").arg(&self.0).status();
    }
}

/// State of the image before the script runs, for comparing afterwards.
struct Before {
    table: PartitionTable,
    boot_sha256: String,
    image_bytes: u64,
    listing: Vec<String>,
}

impl Before {
    fn capture(fixture: &Fixture) -> Before {
        let table = read_partition_table(&fixture.image);
        let boot = table.partitions[0].clone();
        Before {
            boot_sha256: sha256_sectors(&fixture.image, boot.start, boot.size),
            table,
            image_bytes: fs::metadata(&fixture.image).expect("image metadata").len(),
            listing: directory_listing(&fixture.directory),
        }
    }
}

/// Checks everything a successful run promises for a reserved partition of
/// `size_mib` MiB.
fn check_provisioned(fixture: &Fixture, before: &Before, output: &Output, size_mib: u64) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "script failed:\n{stderr}");
    let expected_line = format!("PARTUUID={DISK_ID:08x}-03  /var/lib/eventpi  ext4  defaults,noatime,nofail  0  2\n");
    assert_eq!(String::from_utf8_lossy(&output.stdout), expected_line, "stdout is the fstab line");

    let table = read_partition_table(&fixture.image);
    let image_bytes = fs::metadata(&fixture.image).expect("image metadata").len();
    let image_sectors = image_bytes / SECTOR_BYTES;
    assert_eq!(image_bytes, before.image_bytes, "image size");
    assert_eq!(table.label, "dos", "partition table type");
    assert_eq!(table.id, before.table.id, "disk identifier");
    assert_eq!(table.partitions.len(), 3, "partitions: {:?}", table.partitions);
    assert_eq!(directory_listing(&fixture.directory), before.listing, "files left beside the image");

    let [boot, root, reserved] = [&table.partitions[0], &table.partitions[1], &table.partitions[2]];
    assert_eq!(boot, &before.table.partitions[0], "partition 1 entry");
    assert_eq!(sha256_sectors(&fixture.image, boot.start, boot.size), before.boot_sha256, "partition 1 content");
    assert_eq!(root.start, before.table.partitions[1].start, "partition 2 start");
    assert_eq!(root.kind, "83", "partition 2 type");
    assert_eq!(root.end(), reserved.start, "partition 2 ends where partition 3 starts");
    assert_eq!(reserved.number, 3, "reserved partition number");
    assert_eq!(reserved.kind, "83", "partition 3 type");
    assert_eq!(reserved.start % MIB_SECTORS, 0, "partition 3 starts on a 1 MiB boundary");
    assert_eq!(reserved.size, size_mib * MIB_SECTORS, "partition 3 size");
    assert!(reserved.end() <= image_sectors, "partition 3 ends inside the image");
    assert!(image_sectors - reserved.end() < MIB_SECTORS, "less than 1 MiB is left after partition 3");

    check_reserved_partition(fixture, reserved);
    check_root_partition(fixture, root);
}

fn check_reserved_partition(fixture: &Fixture, reserved: &Partition) {
    assert_eq!(probe(&fixture.image, reserved, "TYPE"), "ext4", "blkid type of partition 3");
    assert_eq!(probe(&fixture.image, reserved, "LABEL"), LABEL, "blkid label of partition 3");

    let filesystem = fixture.extract(reserved, "reserved.check");
    run(tool("e2fsck").args(["-f", "-n"]).arg(&filesystem));
    assert_eq!(superblock_field(&filesystem, "Filesystem volume name"), LABEL, "label");
    assert_eq!(superblock_field(&filesystem, "Reserved block count"), "0", "blocks reserved for root");
    let features = superblock_field(&filesystem, "Filesystem features");
    assert!(!features.contains("orphan_file"), "features readable by e2fsck before 1.47: {features}");
    let bytes = superblock_field(&filesystem, "Block count").parse::<u64>().expect("block count")
        * superblock_field(&filesystem, "Block size").parse::<u64>().expect("block size");
    assert_eq!(bytes, reserved.size * SECTOR_BYTES, "filesystem fills partition 3");
    assert_eq!(ext4_directory_names(&filesystem, "/"), [".", "..", "lost+found"], "root directory of partition 3");
    assert_eq!(ext4_directory_names(&filesystem, "/lost+found"), [".", ".."], "lost+found of partition 3");
    fs::remove_file(&filesystem).expect("remove extracted partition");

    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root || !loop_devices_work() {
        eprintln!("NOTE: no loop device available to this user; partition 3 was checked with e2fsck and debugfs only");
        return;
    }
    let mount_point = fixture.scratch.join("mnt");
    fs::create_dir_all(&mount_point).expect("create mount point");
    run(tool("mount")
        .args(["-t", "ext4", "-o"])
        .arg(format!("ro,loop,offset={},sizelimit={}", reserved.start * SECTOR_BYTES, reserved.size * SECTOR_BYTES))
        .arg(&fixture.image)
        .arg(&mount_point));
    let guard = MountGuard(mount_point.clone());
    assert_eq!(directory_listing(&mount_point), ["lost+found"], "mounted partition 3");
    assert!(directory_listing(&mount_point.join("lost+found")).is_empty(), "mounted lost+found");
    drop(guard);
}

fn check_root_partition(fixture: &Fixture, root: &Partition) {
    assert_eq!(probe(&fixture.image, root, "TYPE"), "ext4", "blkid type of partition 2");

    let filesystem = fixture.extract(root, "root.check");
    run(tool("e2fsck").args(["-f", "-n"]).arg(&filesystem));
    let block_bytes: u64 = superblock_field(&filesystem, "Block size").parse().expect("block size");
    let filesystem_bytes = superblock_field(&filesystem, "Block count").parse::<u64>().expect("block count") * block_bytes;
    let partition_bytes = root.size * SECTOR_BYTES;
    assert!(filesystem_bytes <= partition_bytes, "root filesystem of {filesystem_bytes} bytes fits partition 2 of {partition_bytes}");
    assert!(partition_bytes - filesystem_bytes < block_bytes, "root filesystem of {filesystem_bytes} bytes fills partition 2 of {partition_bytes}");

    let dump = fixture.scratch.join("root-dump");
    fs::create_dir_all(&dump).expect("create dump directory");
    run(tool("debugfs").args(["-R", &format!("rdump / {}", dump.display())]).arg(&filesystem));
    let mut found = tree_manifest(&dump);
    assert_eq!(found.remove(Path::new("lost+found")), Some("dir".to_string()), "lost+found in root filesystem");
    assert_eq!(found, tree_manifest(&fixture.root_source), "files of the root filesystem");
    fs::remove_file(&filesystem).expect("remove extracted partition");
}

/// Runs the script and checks that it rejects the image with `status` and a
/// message containing `message`, leaving the image and its directory as they were.
fn assert_rejected(fixture: &Fixture, arguments: &[&str], status: i32, message: &str) {
    let sha256 = fixture.sha256();
    let listing = directory_listing(&fixture.directory);

    let output = fixture.provision(arguments);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "exit status for {arguments:?}; stderr:\n{stderr}");
    assert!(stderr.contains(message), "stderr for {arguments:?} lacks {message:?}:\n{stderr}");
    if status == 1 {
        assert!(stderr.contains("was not changed"), "stderr for {arguments:?} says the image is unchanged:\n{stderr}");
    }
    assert!(output.stdout.is_empty(), "stdout for {arguments:?}: {}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(fixture.sha256(), sha256, "image sha256 after {arguments:?}");
    assert_eq!(directory_listing(&fixture.directory), listing, "files beside the image after {arguments:?}");
}

#[test]
fn default_size_shrinks_root() {
    let fixture = Fixture::build(&Layout::new(400, 24));
    fs::set_permissions(&fixture.image, fs::Permissions::from_mode(0o640)).expect("set image mode");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    if is_root {
        std::os::unix::fs::chown(&fixture.image, Some(65534), Some(65534)).expect("give the image to nobody");
    }
    let before = Before::capture(&fixture);
    let owner = fs::metadata(&fixture.image).expect("image metadata");

    let output = fixture.provision(&[]);

    check_provisioned(&fixture, &before, &output, 256);
    let root = &read_partition_table(&fixture.image).partitions[1];
    assert!(root.size < before.table.partitions[1].size, "partition 2 shrank");
    let after = fs::metadata(&fixture.image).expect("image metadata");
    assert_eq!(after.permissions().mode() & 0o7777, 0o640, "image mode");
    assert_eq!((after.uid(), after.gid()), (owner.uid(), owner.gid()), "image owner");
}

#[test]
fn enlarged_image_grows_root() {
    let fixture = Fixture::build(&Layout::new(200, 16));
    set_file_size(&fixture.image, 400 * MIB);
    let before = Before::capture(&fixture);

    let output = fixture.provision(&["--size", "64"]);

    check_provisioned(&fixture, &before, &output, 64);
    let root = &read_partition_table(&fixture.image).partitions[1];
    assert_eq!(root.end(), (400 - 64) * MIB_SECTORS, "partition 2 grew up to partition 3");
}

#[test]
fn unaligned_image_end_and_small_blocks() {
    let mut layout = Layout::new(0, 8);
    layout.image_bytes = 300 * MIB + 7 * SECTOR_BYTES;
    layout.root_block_bytes = 1024;
    let fixture = Fixture::build(&layout);
    let before = Before::capture(&fixture);

    let output = fixture.provision(&["--size=32"]);

    check_provisioned(&fixture, &before, &output, 32);
}

#[test]
fn unprivileged_user_provisions() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("NOTE: the tests run without root, so every test already runs the script unprivileged");
        return;
    }
    let fixture = Fixture::build(&Layout::new(300, 8));
    let nobody = 65534;
    fs::set_permissions(fixture.temporary_directory.path(), fs::Permissions::from_mode(0o755)).expect("open the temporary directory to all users");
    std::os::unix::fs::chown(&fixture.directory, Some(nobody), Some(nobody)).expect("give the image directory to nobody");
    std::os::unix::fs::chown(&fixture.image, Some(nobody), Some(nobody)).expect("give the image to nobody");
    let before = Before::capture(&fixture);

    // A PATH without the sbin directories, as ordinary users on Debian have.
    let output = tool("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "env", "PATH=/usr/bin:/bin", SCRIPT, "--size", "64"])
        .arg(&fixture.image)
        .output()
        .expect("start setpriv");

    check_provisioned(&fixture, &before, &output, 64);
}

#[test]
fn second_run_rejects_provisioned_image() {
    let fixture = Fixture::build(&Layout::new(300, 8));
    let first = fixture.provision(&["--size", "64"]);
    assert_eq!(first.status.code(), Some(0), "first run:\n{}", String::from_utf8_lossy(&first.stderr));

    assert_rejected(&fixture, &["--size", "64"], 1, "partition 3 already exists and is the reserved partition");
    assert_rejected(&fixture, &[], 1, &format!("PARTUUID={DISK_ID:08x}-03"));
}

#[test]
fn full_root_rejects_without_room() {
    // Partition 2 is 108 MiB and contains 70 MiB of files. Reserving 64 MiB
    // would leave it 44 MiB.
    let fixture = Fixture::build(&Layout::new(160, 70));

    assert_rejected(&fixture, &["--size", "64"], 1, "no room: the root filesystem needs at least");
}

#[test]
fn oversized_reservation_rejects() {
    let fixture = Fixture::build(&Layout::new(160, 4));

    assert_rejected(&fixture, &["--size", "512"], 1, "smaller than the reserved partition of 512 MiB");
    assert_rejected(&fixture, &["--size", "120"], 1, "before the root partition starts");
}

#[test]
fn existing_partition_3_rejects() {
    let mut layout = Layout::new(300, 4);
    layout.root_sectors = Some(200 * MIB_SECTORS);
    let fixture = Fixture::build(&layout);
    let data_start = ROOT_START + 200 * MIB_SECTORS;
    let data_sectors = 300 * MIB_SECTORS - data_start;
    let data = fixture.scratch.join("data.ext4");
    set_file_size(&data, data_sectors * SECTOR_BYTES);
    run(tool("mkfs.ext4").args(["-q", "-L", "data"]).arg(&data));
    copy_bytes(&data, 0, data_sectors * SECTOR_BYTES, &fixture.image, data_start * SECTOR_BYTES);
    fs::remove_file(&data).expect("remove data filesystem file");
    run_sfdisk_script(&fixture.image, &["--append"], &format!("start={data_start}, size={data_sectors}, type=83\n"));

    assert_rejected(&fixture, &[], 1, "partition 3 already exists (ext4 labelled data)");
}

#[test]
fn unexpected_layouts_reject() {
    let no_table = Fixture::build(&Layout::new(100, 1));
    zero_bytes(&no_table.image, 0, SECTOR_BYTES);
    assert_rejected(&no_table, &[], 1, "has no partition table that sfdisk can read");

    let gpt = Fixture::build(&Layout::new(100, 1));
    write_partition_table(
        &gpt.image,
        &format!("label: gpt\n\nstart={BOOT_START}, size={BOOT_SECTORS}, type=uefi\nstart={ROOT_START}, size=50000, type=linux\n"),
    );
    assert_rejected(&gpt, &[], 1, "has a 'gpt' partition table; expected MBR (dos)");

    let single = Fixture::build(&Layout::new(100, 1));
    write_partition_table(&single.image, &format!("label: dos\n\nstart={BOOT_START}, size={BOOT_SECTORS}, type=c\n"));
    assert_rejected(&single, &[], 1, "expected partition 1 (boot) and partition 2 (root)");

    let boot_type = Fixture::build(&Layout::new(100, 1));
    run(tool("sfdisk").args(["--quiet", "--part-type"]).arg(&boot_type.image).args(["1", "83"]));
    assert_rejected(&boot_type, &[], 1, "partition 1 has type 83; expected a FAT type");

    let blank_boot = Fixture::build(&Layout::new(100, 1));
    zero_bytes(&blank_boot.image, BOOT_START * SECTOR_BYTES, MIB);
    assert_rejected(&blank_boot, &[], 1, "partition 1 contains no filesystem; expected a FAT (vfat) boot filesystem");

    let mut ext2_layout = Layout::new(100, 1);
    ext2_layout.root_filesystem = "ext2";
    let ext2_root = Fixture::build(&ext2_layout);
    assert_rejected(&ext2_root, &[], 1, "partition 2 contains ext2 labelled rootfs; expected an ext4 root filesystem");
}

#[test]
fn damaged_root_rejects() {
    let fixture = Fixture::build(&Layout::new(300, 2));
    let table = read_partition_table(&fixture.image);
    let root = fixture.extract(&table.partitions[1], "root.fs");
    // Clearing the inode of a file that a directory still names is an
    // inconsistency e2fsck -p does not repair on its own.
    run(tool("debugfs").args(["-w", "-R", "clri /etc/hostname"]).arg(&root));
    let root_bytes = table.partitions[1].size * SECTOR_BYTES;
    let mut image = fs::OpenOptions::new().write(true).open(&fixture.image).expect("open image");
    image.seek(SeekFrom::Start(table.partitions[1].start * SECTOR_BYTES)).expect("seek to partition 2");
    io::copy(&mut File::open(&root).expect("open root copy").take(root_bytes), &mut image).expect("write partition 2 back");
    drop(image);

    assert_rejected(&fixture, &["--size", "64"], 1, "the root filesystem (partition 2) is not clean");
}

#[test]
fn invalid_arguments_reject() {
    let fixture = Fixture::build(&Layout::new(100, 1));
    let cases: [(&[&str], &str); 7] = [
        (&["--size", "abc"], "invalid --size 'abc'"),
        (&["--size", "0"], "--size 0 MiB is below the minimum of 16 MiB"),
        (&["--size", "15"], "--size 15 MiB is below the minimum of 16 MiB"),
        (&["--size=-5"], "invalid --size '-5'"),
        (&["--size", "1e3"], "invalid --size '1e3'"),
        (&["--force"], "unknown option --force"),
        (&["--size"], "expected one IMAGE argument, got 0"),
    ];

    for (arguments, message) in cases {
        assert_rejected(&fixture, arguments, 2, message);
    }
}

#[test]
fn non_image_paths_reject() {
    let fixture = Fixture::build(&Layout::new(100, 1));

    let missing = fixture.directory.join("missing.img");
    let output = Command::new(SCRIPT).arg(&missing).output().expect("start script");
    assert_eq!(output.status.code(), Some(1), "exit status for a missing file");
    assert!(String::from_utf8_lossy(&output.stderr).contains("file not found"), "message for a missing file");
    assert!(!missing.exists(), "no file created for a missing image");

    let fifo = fixture.directory.join("pipe.img");
    run(tool("mkfifo").arg(&fifo));
    let output = Command::new(SCRIPT).arg(&fifo).output().expect("start script");
    assert_eq!(output.status.code(), Some(1), "exit status for a FIFO");
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a regular file"), "message for a FIFO");

    let odd = fixture.directory.join("odd.img");
    fs::write(&odd, vec![0u8; 1000]).expect("write odd-sized file");
    let output = Command::new(SCRIPT).arg(&odd).output().expect("start script");
    assert_eq!(output.status.code(), Some(1), "exit status for a file of 1000 bytes");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a whole number of 512-byte sectors"), "message for a file of 1000 bytes");
}

#[test]
fn locked_image_rejects() {
    let fixture = Fixture::build(&Layout::new(100, 1));
    let holder = File::open(&fixture.image).expect("open image");
    // SAFETY: the descriptor is open for the duration of the call.
    let locked = unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, 0, "test takes the lock");

    assert_rejected(&fixture, &[], 1, "another process holds a lock on");
    drop(holder);
}

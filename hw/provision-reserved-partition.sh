#!/usr/bin/env bash
# Adds the eventpi reserved partition to a Raspberry Pi OS image file.
#
# The image must have the layout Raspberry Pi OS ships: an MBR (dos) partition
# table with partition 1 FAT (boot), partition 2 ext4 (root) and nothing else.
# The script puts partition 3, ext4 labelled eventpi-reserved, into the last
# SIZE MiB of the image file, starting on a 1 MiB boundary. Partition 2 and its
# filesystem are resized to end where partition 3 starts. They shrink when the
# root partition runs to the end of the image. They grow into free space when
# the image file was enlarged first (truncate -s). On success the script prints
# the /etc/fstab line for partition 3 on standard output.
#
# The script uses no loop devices and needs no root privileges, so it also runs
# in containers and CI jobs without loop devices, and an interrupted run leaves
# no loop device attached. Every filesystem tool works on a file that contains
# one partition, and dd copies partitions in and out of the image by byte
# offset. The new image is assembled in a file beside IMAGE and renamed over
# IMAGE only after every step and check passed, so a rejection, a failure or an
# interruption leaves IMAGE byte for byte unchanged.
#
# Exit status: 0 done, 1 rejected or failed (IMAGE unchanged), 2 usage error.
set -euo pipefail

# Debian puts sfdisk, e2fsck and mke2fs in /usr/sbin, which is not on the PATH
# of ordinary users.
PATH=$PATH:/usr/sbin:/sbin

readonly PROGRAM=${0##*/}
readonly LABEL=eventpi-reserved
readonly MOUNT_POINT=/var/lib/eventpi
readonly DEFAULT_SIZE_MIB=256
# A 16 MiB filesystem made by this script has 11.7 MiB free after its ext4
# journal and metadata (mke2fs 1.47.0). That is room for the agent's journal
# file (2052 KiB by default, journal.size_kib) and little else.
readonly MIN_SIZE_MIB=16
readonly SECTOR_BYTES=512
readonly MIB_SECTORS=2048
# MBR partition entries store start and size as 32-bit sector counts.
readonly MBR_MAX_SECTORS=4294967295
# The ext4 features of Debian 12's mke2fs.conf, named here so the result does
# not depend on the host's mke2fs.conf. Upstream e2fsprogs 1.47.0 also enables
# orphan_file and metadata_csum_seed there (its release notes), and orphan_file
# needs e2fsck 1.47 and Linux 5.15.
readonly RESERVED_FEATURES=none,has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize,sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr

usage() {
  cat <<EOF
Usage: $PROGRAM [--size MIB] IMAGE

Adds partition 3 (ext4, label $LABEL) at the end of the Raspberry Pi OS
image file IMAGE, resizing the root partition 2 to make room, and prints the
/etc/fstab line that mounts it at $MOUNT_POINT.

Options:
  --size MIB   size of the reserved partition in MiB (default $DEFAULT_SIZE_MIB,
               minimum $MIN_SIZE_MIB)
  -h, --help   show this help

To give the root filesystem more room, enlarge the image file first, for
example: truncate -s 8G IMAGE
EOF
}

fail() {
  echo "$PROGRAM: $*" >&2
  echo "$PROGRAM: $image_path was not changed" >&2
  exit 1
}

usage_error() {
  echo "$PROGRAM: $*" >&2
  echo "Run '$PROGRAM --help' for usage." >&2
  exit 2
}

progress() {
  echo "$PROGRAM: $*" >&2
}

mib() {
  echo $(( $1 / MIB_SECTORS ))
}

image_path=
size_mib=$DEFAULT_SIZE_MIB

parse_arguments() {
  local size_text=$DEFAULT_SIZE_MIB

  while [ $# -gt 0 ]; do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --size) [ $# -ge 2 ] || usage_error "--size needs a value in MiB"
              size_text=$2; shift 2 ;;
      --size=*) size_text=${1#--size=}; shift ;;
      --) shift; break ;;
      -*) usage_error "unknown option $1" ;;
      *) break ;;
    esac
  done
  [ $# -eq 1 ] || usage_error "expected one IMAGE argument, got $#"
  image_path=$1

  [[ $size_text =~ ^[0-9]{1,7}$ ]] || usage_error "invalid --size '$size_text': give a whole number of MiB, such as 256"
  size_mib=$(( 10#$size_text ))
  (( size_mib >= MIN_SIZE_MIB )) || usage_error "--size $size_mib MiB is below the minimum of $MIN_SIZE_MIB MiB"
}

check_tools() {
  local tool missing=()

  for tool in sfdisk blkid e2fsck resize2fs mke2fs dumpe2fs dd truncate cmp flock realpath; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] || fail "missing tools: ${missing[*]}; install fdisk, util-linux, e2fsprogs and coreutils"
}

# Resolves IMAGE, checks that it is a writable regular file and takes an
# exclusive lock on it for the rest of the run.
open_image() {
  [ -e "$image_path" ] || fail "$image_path: file not found"
  image_path=$(realpath -e -- "$image_path")
  [ -f "$image_path" ] || fail "$image_path is not a regular file; this script only changes image files, never a device such as /dev/mmcblk0"
  if [ ! -r "$image_path" ] || [ ! -w "$image_path" ]; then
    fail "$image_path: read and write permission needed"
  fi

  image_bytes=$(stat -c %s -- "$image_path")
  (( image_bytes % SECTOR_BYTES == 0 )) || fail "$image_path is $image_bytes bytes, not a whole number of 512-byte sectors; it is not a disk image"
  image_sectors=$(( image_bytes / SECTOR_BYTES ))

  exec {image_lock}<"$image_path"
  flock --exclusive --nonblock "$image_lock" || fail "another process holds a lock on $image_path; wait for it to finish"
}

# Prints "NUMBER START SIZE TYPE" for each partition in the MBR of FILE.
partition_lines() {
  sfdisk --dump -- "$1" 2>/dev/null \
    | sed -n 's/^.*[^0-9]\([0-9][0-9]*\) : start= *\([0-9]*\), size= *\([0-9]*\), type=\([0-9a-fA-F]*\).*$/\1 \2 \3 \4/p'
}

# Prints the filesystem type and label found at a sector range of FILE.
probe_filesystem() {
  local file=$1 start=$2 size=$3 type label

  type=$(blkid -p -u filesystem -O $(( start * SECTOR_BYTES )) -S $(( size * SECTOR_BYTES )) -s TYPE -o value -- "$file" 2>/dev/null || true)
  label=$(blkid -p -u filesystem -O $(( start * SECTOR_BYTES )) -S $(( size * SECTOR_BYTES )) -s LABEL -o value -- "$file" 2>/dev/null || true)
  echo "${type:-no filesystem}${label:+ labelled $label}"
}

describe_partitions() {
  local number start size type

  echo "Partitions found in $image_path:" >&2
  while read -r number start size type; do
    echo "  partition $number: start sector $start, $(mib "$size") MiB, type $type, $(probe_filesystem "$image_path" "$start" "$size")" >&2
  done <<<"$table"
}

read_partition_table() {
  local dump number start size type

  dump=$(sfdisk --dump -- "$image_path" 2>&1) || fail "$image_path has no partition table that sfdisk can read ($dump); expected a Raspberry Pi OS image"
  table_label=$(sed -n 's/^label: //p' <<<"$dump")
  disk_id=$(sed -n 's/^label-id: //p' <<<"$dump")
  [ "$table_label" = dos ] || fail "$image_path has a '$table_label' partition table; expected MBR (dos) as Raspberry Pi OS images have"

  table=$(partition_lines "$image_path")
  declare -gA starts=() sizes=() types=()
  while read -r number start size type; do
    [ -n "$number" ] || continue
    starts[$number]=$start
    sizes[$number]=$size
    types[$number]=${type,,}
  done <<<"$table"
}

reject_partition_3() {
  local found

  [ -n "${starts[3]:-}" ] || return 0
  describe_partitions
  found=$(probe_filesystem "$image_path" "${starts[3]}" "${sizes[3]}")
  if [ "$found" = "ext4 labelled $LABEL" ]; then
    echo "The image already has the reserved partition. Its fstab line:" >&2
    echo "  $(fstab_line)" >&2
    fail "partition 3 already exists and is the reserved partition; nothing to do"
  fi
  fail "partition 3 already exists ($found); start from an unmodified Raspberry Pi OS image, or delete partition 3 with 'sfdisk --delete IMAGE 3' if its data is not needed"
}

check_layout() {
  local number boot_filesystem root_filesystem

  reject_partition_3
  for number in "${!starts[@]}"; do
    if [ "$number" != 1 ] && [ "$number" != 2 ]; then
      describe_partitions
      fail "unexpected partition $number; expected only partition 1 (boot) and partition 2 (root)"
    fi
  done
  if [ -z "${starts[1]:-}" ] || [ -z "${starts[2]:-}" ]; then
    describe_partitions
    fail "expected partition 1 (boot) and partition 2 (root); the image is not a Raspberry Pi OS image"
  fi

  boot_end=$(( starts[1] + sizes[1] ))
  root_start=${starts[2]}
  root_sectors=${sizes[2]}
  root_end=$(( root_start + root_sectors ))
  if (( starts[1] < 1 || boot_end > root_start || root_end > image_sectors )); then
    describe_partitions
    fail "partition 1 must come before partition 2, and both must fit in the image of $image_sectors sectors"
  fi

  case ${types[1]} in
    b|c|e) ;;
    *) describe_partitions; fail "partition 1 has type ${types[1]}; expected a FAT type (c, b or e)" ;;
  esac
  [ "${types[2]}" = 83 ] || { describe_partitions; fail "partition 2 has type ${types[2]}; expected 83 (Linux)"; }

  boot_filesystem=$(probe_filesystem "$image_path" "${starts[1]}" "${sizes[1]}")
  [[ $boot_filesystem == vfat* ]] || { describe_partitions; fail "partition 1 contains $boot_filesystem; expected a FAT (vfat) boot filesystem"; }
  root_filesystem=$(probe_filesystem "$image_path" "$root_start" "$root_sectors")
  [[ $root_filesystem == ext4* ]] || { describe_partitions; fail "partition 2 contains $root_filesystem; expected an ext4 root filesystem"; }
}

# Places partition 3 in the last SIZE MiB of the image with its start rounded
# down to a 1 MiB boundary. Partition 2 keeps its start and ends there.
plan_layout() {
  reserved_sectors=$(( size_mib * MIB_SECTORS ))
  (( image_sectors > reserved_sectors )) || fail "the image ($(mib "$image_sectors") MiB) is smaller than the reserved partition of $size_mib MiB; use a smaller --size or enlarge the image with truncate -s"

  reserved_start=$(( (image_sectors - reserved_sectors) / MIB_SECTORS * MIB_SECTORS ))
  (( reserved_start + reserved_sectors <= MBR_MAX_SECTORS )) || fail "the image is larger than the 2 TiB that an MBR partition table can address"
  (( reserved_start > root_start )) || fail "no room: partition 3 of $size_mib MiB would start at sector $reserved_start, before the root partition starts at sector $root_start; use a smaller --size or enlarge the image with truncate -s"

  new_root_sectors=$(( reserved_start - root_start ))
}

make_work_directory() {
  local image_directory image_name

  image_directory=$(dirname -- "$image_path")
  image_name=$(basename -- "$image_path")
  work_directory=$(mktemp -d "$image_directory/.$image_name.provision.XXXXXX") \
    || fail "creating a work directory in $image_directory failed; the directory needs write permission and free space for the root partition's data"
  trap 'rm -rf -- "$work_directory"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  root_file=$work_directory/root.ext4
  reserved_file=$work_directory/reserved.ext4
  work_image=$work_directory/image
}

# Copies LENGTH bytes from SOURCE at SOURCE_OFFSET to TARGET at TARGET_OFFSET.
# conv=sparse seeks over zero blocks instead of writing them, so the target
# range must already read as zeros: a new file or a hole left by truncate.
copy_bytes() {
  local source=$1 source_offset=$2 length=$3 target=$4 target_offset=$5

  dd if="$source" skip="$source_offset" count="$length" of="$target" seek="$target_offset" \
     bs=4M iflag=skip_bytes,count_bytes,fullblock oflag=seek_bytes conv=notrunc,sparse status=none
}

extract_root_filesystem() {
  progress "copying the root filesystem (partition 2, $(mib "$root_sectors") MiB) out of the image"
  truncate -s $(( root_sectors * SECTOR_BYTES )) -- "$root_file" || fail "creating $root_file failed"
  copy_bytes "$image_path" $(( root_start * SECTOR_BYTES )) $(( root_sectors * SECTOR_BYTES )) "$root_file" 0 \
    || fail "copying partition 2 out of the image failed; check free space in $(dirname -- "$image_path")"
}

# Reads one "Name: value" field of the superblock of the root file.
superblock_field() {
  dumpe2fs -h -- "$root_file" 2>/dev/null | sed -n "s/^$1: *//p"
}

check_root_filesystem() {
  local output status

  # A full check is also what resize2fs requires before it resizes.
  status=0
  output=$(e2fsck -f -p -- "$root_file" 2>&1) || status=$?
  if [ "$status" -ne 0 ]; then
    echo "$output" >&2
    fail "the root filesystem (partition 2) is not clean: e2fsck -f -p exited with $status; repair it with e2fsck -f first or start from a fresh download"
  fi

  block_bytes=$(superblock_field 'Block size')
  block_count=$(superblock_field 'Block count')
  free_blocks=$(superblock_field 'Free blocks')
  (( block_count * block_bytes <= root_sectors * SECTOR_BYTES )) \
    || fail "the root filesystem ($block_count blocks of $block_bytes bytes) is larger than partition 2; the image is damaged"

  new_block_count=$(( new_root_sectors * SECTOR_BYTES / block_bytes ))
  minimum_blocks=$(resize2fs -P -- "$root_file" 2>/dev/null | sed -n 's/^Estimated minimum size of the filesystem: //p')
  [ -n "$minimum_blocks" ] || fail "resize2fs -P could not estimate the minimum size of the root filesystem"
  if (( new_block_count < minimum_blocks )); then
    fail "no room: the root filesystem needs at least $(( minimum_blocks * block_bytes / 1048576 )) MiB (estimate of resize2fs -P) but partition 2 would shrink to $(( new_block_count * block_bytes / 1048576 )) MiB to make room for $size_mib MiB; use a smaller --size or enlarge the image with truncate -s"
  fi
}

resize_root_filesystem() {
  local output used_blocks

  used_blocks=$(( block_count - free_blocks ))
  if (( new_block_count == block_count )); then
    progress "the root filesystem keeps its size"
  else
    if (( new_block_count > block_count )); then
      truncate -s $(( new_block_count * block_bytes )) -- "$root_file" || fail "enlarging $root_file failed; check free space in $(dirname -- "$image_path")"
    fi
    progress "resizing the root filesystem from $(( block_count * block_bytes / 1048576 )) MiB to $(( new_block_count * block_bytes / 1048576 )) MiB"
    output=$(resize2fs -- "$root_file" "$new_block_count" 2>&1) || { echo "$output" >&2; fail "resize2fs failed on the root filesystem"; }
  fi

  output=$(e2fsck -f -n -- "$root_file" 2>&1) || { echo "$output" >&2; fail "the resized root filesystem failed e2fsck -f -n"; }
  progress "root filesystem: $(( new_block_count * block_bytes / 1048576 )) MiB, about $(( (new_block_count - used_blocks) * block_bytes / 1048576 )) MiB free"
}

make_reserved_filesystem() {
  local output

  truncate -s $(( reserved_sectors * SECTOR_BYTES )) -- "$reserved_file" || fail "creating $reserved_file failed"
  # -m 0 reserves no blocks for root, so the agent may use all of them.
  # lazy_*_init=0 makes mke2fs write the inode tables and the journal now, so
  # the device does not initialise them in the background after the first boot.
  output=$(mke2fs -t ext4 -O "$RESERVED_FEATURES" -b 4096 -I 256 -i 16384 -m 0 -L "$LABEL" \
             -E lazy_itable_init=0,lazy_journal_init=0 -q -- "$reserved_file" 2>&1) \
    || { echo "$output" >&2; fail "mke2fs failed on the reserved filesystem"; }
}

assemble_image() {
  progress "assembling the new image"
  truncate -s "$image_bytes" -- "$work_image" || fail "creating $work_image failed"
  copy_bytes "$image_path" 0 $(( root_start * SECTOR_BYTES )) "$work_image" 0 \
    || fail "copying the partition table and partition 1 failed"
  copy_bytes "$root_file" 0 $(( new_block_count * block_bytes )) "$work_image" $(( root_start * SECTOR_BYTES )) \
    || fail "copying the root filesystem into the new image failed"
  copy_bytes "$reserved_file" 0 $(( reserved_sectors * SECTOR_BYTES )) "$work_image" $(( reserved_start * SECTOR_BYTES )) \
    || fail "copying the reserved filesystem into the new image failed"
}

write_partition_table() {
  local output
  local options=(--no-reread --no-tell-kernel --wipe never --wipe-partitions never --quiet)

  # -N 2 with only a size keeps the start and type of partition 2, and
  # --append adds partition 3 without touching the other entries.
  output=$(echo "size=$new_root_sectors" | sfdisk "${options[@]}" -N 2 -- "$work_image" 2>&1) \
    || { echo "$output" >&2; fail "sfdisk failed to resize partition 2"; }
  output=$(echo "start=$reserved_start, size=$reserved_sectors, type=83" | sfdisk "${options[@]}" --append -- "$work_image" 2>&1) \
    || { echo "$output" >&2; fail "sfdisk failed to add partition 3"; }
}

verify_image() {
  local expected actual reserved_filesystem

  expected=$(printf '1 %s %s %s\n2 %s %s 83\n3 %s %s 83' \
    "${starts[1]}" "${sizes[1]}" "${types[1]}" "$root_start" "$new_root_sectors" "$reserved_start" "$reserved_sectors")
  actual=$(partition_lines "$work_image" | tr 'A-F' 'a-f')
  [ "$actual" = "$expected" ] || fail "the new partition table differs from the plan: expected '$expected', sfdisk wrote '$actual'"
  [ "$(sfdisk --disk-id -- "$work_image")" = "$disk_id" ] || fail "the disk identifier changed while writing the partition table"

  # Everything before partition 2 except the MBR in sector 0 is copied unchanged.
  cmp --quiet --ignore-initial=$SECTOR_BYTES --bytes=$(( (root_start - 1) * SECTOR_BYTES )) -- "$image_path" "$work_image" \
    || fail "partition 1 in the new image differs from the original"
  cmp --quiet --ignore-initial=0:$(( root_start * SECTOR_BYTES )) --bytes=$(( new_block_count * block_bytes )) -- "$root_file" "$work_image" \
    || fail "the root filesystem in the new image differs from the resized copy"
  cmp --quiet --ignore-initial=0:$(( reserved_start * SECTOR_BYTES )) --bytes=$(( reserved_sectors * SECTOR_BYTES )) -- "$reserved_file" "$work_image" \
    || fail "the reserved filesystem in the new image differs from the one made"

  reserved_filesystem=$(probe_filesystem "$work_image" "$reserved_start" "$reserved_sectors")
  [ "$reserved_filesystem" = "ext4 labelled $LABEL" ] || fail "partition 3 of the new image contains $reserved_filesystem; expected ext4 labelled $LABEL"
}

replace_image() {
  local owner

  chmod --reference="$image_path" -- "$work_image" || fail "copying the permissions of $image_path to the new image failed"
  owner=$(stat -c %U:%G -- "$image_path")
  if [ "$(stat -c %U:%G -- "$work_image")" != "$owner" ]; then
    chown --reference="$image_path" -- "$work_image" 2>/dev/null \
      || progress "setting the owner of the new image to $owner failed, so it belongs to $(id -un); run as root to keep the owner"
  fi
  sync -- "$work_image" || fail "syncing $work_image failed"
  mv -f -- "$work_image" "$image_path" || fail "renaming $work_image to $image_path failed"
  sync -- "$(dirname -- "$image_path")" || progress "syncing the directory of $image_path failed; run sync before removing the disk"
}

# The PARTUUID is the MBR disk identifier and the partition number. Raspberry
# Pi OS gives the disk a new identifier on first boot and replaces every
# occurrence of the old one in /etc/fstab, this line included (firstboot and
# the initramfs set_partuuid script of raspberrypi-sys-mods).
fstab_line() {
  printf 'PARTUUID=%08x-03  %s  ext4  defaults,noatime,nofail  0  2\n' "$disk_id" "$MOUNT_POINT"
}

main() {
  parse_arguments "$@"
  check_tools
  open_image
  read_partition_table
  check_layout
  plan_layout
  make_work_directory
  extract_root_filesystem
  check_root_filesystem
  resize_root_filesystem
  make_reserved_filesystem
  assemble_image
  write_partition_table
  verify_image
  replace_image

  progress "partition 3 ($LABEL): $size_mib MiB from sector $reserved_start; add this line to /etc/fstab on the device:"
  fstab_line
}

main "$@"

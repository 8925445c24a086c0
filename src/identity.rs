//! Identity of this agent: its own container id when it runs in Docker,
//! otherwise the host name.

/// Finds this process's container id in `/proc/self/mountinfo`. Docker bind
/// mounts the container's `hostname`, `hosts` and `resolv.conf` from
/// `.../containers/<id>/`, and this is true with a private cgroup namespace
/// too, where `/proc/self/cgroup` shows only `/`.
pub fn own_container_id() -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    container_id_from_mountinfo(&mountinfo)
}

/// Extracts the container id from the text of a mountinfo file.
pub fn container_id_from_mountinfo(mountinfo: &str) -> Option<String> {
    for line in mountinfo.lines() {
        let mut fields = line.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        let own_file = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"].contains(&mount_point);
        if !own_file {
            continue;
        }
        if let Some(id) = id_after(root, "/containers/") {
            return Some(id);
        }
    }
    None
}

fn id_after(path: &str, marker: &str) -> Option<String> {
    let start = path.find(marker)? + marker.len();
    let candidate: String = path[start..].chars().take_while(char::is_ascii_hexdigit).collect();
    (candidate.len() == 64).then_some(candidate)
}

/// Returns the name the lease and the logs use for this agent.
pub fn holder_name() -> String {
    if let Some(id) = own_container_id() {
        return format!("container:{}", &id[..12]);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("host:{}:{}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f5a0c1e9d2b4a6f8e7c5b3a1d9f0e2c4b6a8d0f1e3c5a7b9d2f4e6a8c0b1d3f";

    #[test]
    fn finds_id_in_docker_mountinfo() {
        let text = format!(
            "600 500 0:50 / / rw,relatime - overlay overlay rw\n\
             610 600 254:1 /var/lib/docker/containers/{ID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda1 rw\n"
        );
        assert_eq!(container_id_from_mountinfo(&text).as_deref(), Some(ID));
    }

    #[test]
    fn ignores_other_mounts_with_ids() {
        let text = format!("610 600 254:1 /volumes/containers/{ID} /data rw - ext4 /dev/vda1 rw\n");
        assert_eq!(container_id_from_mountinfo(&text), None);
    }

    #[test]
    fn host_has_no_container_id() {
        let text = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n";
        assert_eq!(container_id_from_mountinfo(text), None);
    }
}

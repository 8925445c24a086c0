//! The `[git]` section and the `[[registry]]` entries: how the agent reaches
//! and trusts the git server and the registries.
//!
//! The configuration names credential files, never a password or token. The
//! agent reads the files and checks their modes when it starts (see
//! [`crate::credentials`]).

use std::path::PathBuf;

use serde::Deserialize;

use super::{Problem, line_of_key};

/// `[git]`: credentials for `stack.repository`, the pinned server host keys
/// and the signature policy for the device branch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct GitConfig {
    /// Private key (OpenSSH format) that the agent offers to an ssh server,
    /// readable by its owner only.
    pub ssh_key_file: Option<PathBuf>,
    /// Public host keys of the ssh server, each `type base64` as in the
    /// server's `/etc/ssh/ssh_host_*_key.pub`. Any other key stops updates.
    pub ssh_host_keys: Vec<String>,
    /// File holding a token for an `https://` repository, readable by its
    /// owner only. Git sends it in an `Authorization` header.
    pub https_token_file: Option<PathBuf>,
    /// User name sent with the token as HTTP basic authentication. Without
    /// it, the token is sent as `Authorization: Bearer`.
    pub https_username: Option<String>,
    /// Applies only commits signed with an SSH key of the allowed signers list.
    pub require_signed_commits: bool,
    /// The allowed signers list (the format of `ssh-keygen -Y verify`), on
    /// the reserved partition.
    pub allowed_signers_file: Option<PathBuf>,
}

/// One `[[registry]]` entry: the credentials for one registry host.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registry host as image references write it, with its port if any:
    /// `registry.example.net`, `127.0.0.1:5000`, or `docker.io`.
    pub host: String,
    pub username: Option<String>,
    /// File holding the password or access token, readable by its owner only.
    pub password_file: Option<PathBuf>,
    /// A Docker `config.json` whose `auths` entry for `host` contains the
    /// credentials, readable by its owner only.
    pub docker_config: Option<PathBuf>,
}

/// Transport that git uses for a repository URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `ssh://[user@]host[:port]/path` or `[user@]host:path`.
    Ssh {
        host: String,
        port: Option<u16>,
    },
    Https,
    /// Plain `http://`, which would send a token in clear text.
    Http,
    /// `git://`, `file://` or a local path.
    Other,
}

impl Transport {
    /// Classifies a repository URL the way git does.
    pub fn of(url: &str) -> Transport {
        if let Some((scheme, rest)) = url.split_once("://") {
            return match scheme.to_ascii_lowercase().as_str() {
                "ssh" | "git+ssh" | "ssh+git" => ssh_authority(rest).unwrap_or(Transport::Other),
                "https" => Transport::Https,
                "http" => Transport::Http,
                _ => Transport::Other,
            };
        }
        // git's scp-like form: a colon before the first slash.
        match (url.find(':'), url.find('/')) {
            (Some(colon), slash) if slash.is_none_or(|slash| colon < slash) => {
                let host = url[..colon].rsplit('@').next().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() { Transport::Other } else { Transport::Ssh { host: host.to_string(), port: None } }
            }
            _ => Transport::Other,
        }
    }

    /// Returns the host name as an OpenSSH `known_hosts` line writes it:
    /// `host` on port 22, `[host]:port` on any other port.
    pub fn known_hosts_pattern(&self) -> Option<String> {
        match self {
            Transport::Ssh { host, port: None | Some(22) } => Some(host.clone()),
            Transport::Ssh { host, port: Some(port) } => Some(format!("[{host}]:{port}")),
            _ => None,
        }
    }
}

fn ssh_authority(rest: &str) -> Option<Transport> {
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(port) => Some(port.parse::<u16>().ok()?),
        None => None,
    };
    Some(Transport::Ssh { host: host.to_string(), port })
}

/// Key types OpenSSH accepts in a `known_hosts` line.
const HOST_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Tells whether `key` reads as `type base64 [comment]` with a known type.
pub fn valid_public_key(key: &str) -> bool {
    let mut parts = key.split_whitespace();
    let (Some(key_type), Some(data)) = (parts.next(), parts.next()) else { return false };
    HOST_KEY_TYPES.contains(&key_type) && data.len() >= 16 && data.chars().all(|character| character.is_ascii_alphanumeric() || "+/=".contains(character))
}

/// Checks the `[git]` section against `stack.repository`.
pub fn check_git(git: &GitConfig, repository: &str, text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut report = |key: &str, message: String| {
        problems.push(Problem { key: key.to_string(), line: line_of_key(text, key), message });
    };

    if crate::secret::url_has_credentials(repository) {
        report(
            "stack.repository",
            format!(
                "{} carries a password or token in the URL; remove it and put the token in the file named by git.https_token_file",
                crate::secret::redact_urls(repository)
            ),
        );
    }

    let transport = Transport::of(repository);
    let is_ssh = matches!(transport, Transport::Ssh { .. });
    if is_ssh {
        if git.ssh_host_keys.is_empty() {
            report("git.ssh_host_keys", "must list the ssh server's public host key for an ssh repository, for example [\"ssh-ed25519 AAAA...\"] from the server's /etc/ssh/ssh_host_ed25519_key.pub".into());
        }
        if git.ssh_key_file.is_none() {
            report("git.ssh_key_file", "must name the deploy key's private key file for an ssh repository".into());
        }
    } else {
        if git.ssh_key_file.is_some() {
            report("git.ssh_key_file", "is only used with an ssh repository; stack.repository is not one".into());
        }
        if !git.ssh_host_keys.is_empty() {
            report("git.ssh_host_keys", "are only used with an ssh repository; stack.repository is not one".into());
        }
    }
    for key in &git.ssh_host_keys {
        if !valid_public_key(key) {
            report("git.ssh_host_keys", format!("{key:?} is not a public key: write it as \"type base64\", for example \"ssh-ed25519 AAAAC3Nza...\""));
        }
    }

    match (&git.https_token_file, &transport) {
        (Some(_), Transport::Https) | (None, _) => {}
        (Some(_), Transport::Http) => report("git.https_token_file", "would be sent in clear text over http://; use an https:// repository".into()),
        (Some(_), _) => report("git.https_token_file", "is only used with an https:// repository; stack.repository is not one".into()),
    }
    if git.https_username.is_some() && git.https_token_file.is_none() {
        report("git.https_username", "needs git.https_token_file".into());
    }
    if let Some(username) = &git.https_username
        && (username.is_empty() || username.contains(':') || username.chars().any(char::is_control))
    {
        report("git.https_username", format!("{username:?} is not a valid user name: it must be non-empty, without ':'"));
    }

    for (key, path) in
        [("git.ssh_key_file", &git.ssh_key_file), ("git.https_token_file", &git.https_token_file), ("git.allowed_signers_file", &git.allowed_signers_file)]
    {
        if let Some(path) = path
            && !path.is_absolute()
        {
            report(key, format!("{} must be an absolute path", path.display()));
        }
    }
    if git.require_signed_commits && git.allowed_signers_file.is_none() {
        report("git.allowed_signers_file", "must name the allowed signers list on the reserved partition when git.require_signed_commits is on".into());
    }
    problems
}

/// Checks the `[[registry]]` entries.
pub fn check_registries(registries: &[RegistryConfig], text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for (index, registry) in registries.iter().enumerate() {
        let mut report = |field: &str, message: String| {
            let line = line_of_array_key(text, "registry", index, field);
            problems.push(Problem { key: format!("registry[{index}].{field}"), line, message });
        };

        let host = registry.host.trim();
        if host.is_empty() || host.contains("://") || host.contains('/') || host.contains(char::is_whitespace) {
            report(
                "host",
                format!(
                    "{:?} is not a registry host: write it as image references do, for example \"registry.example.net\" or \"127.0.0.1:5000\"",
                    registry.host
                ),
            );
        }
        if seen.contains(&host) {
            report("host", format!("{host:?} has another [[registry]] entry above; keep one per host"));
        }
        seen.push(host);

        match (&registry.username, &registry.password_file, &registry.docker_config) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (_, _, Some(_)) => report("docker_config", "cannot be combined with username and password_file; use one or the other".into()),
            (Some(_), None, None) => report("password_file", "is missing: username needs a password_file".into()),
            (None, Some(_), None) => report("username", "is missing: password_file needs a username".into()),
            (None, None, None) => report("host", "has no credentials: set username and password_file, or docker_config".into()),
        }
        if registry.username.as_ref().is_some_and(|username| username.is_empty() || username.contains(':')) {
            report("username", "must be non-empty, without ':'".into());
        }
        for (field, path) in [("password_file", &registry.password_file), ("docker_config", &registry.docker_config)] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                report(field, format!("{} must be an absolute path", path.display()));
            }
        }
    }
    problems
}

/// Finds the line of `key` in the `index`-th (0-based) `[[array]]` table, or
/// of the table's header when `key` is not written in it.
pub fn line_of_array_key(text: &str, array: &str, index: usize, key: &str) -> Option<usize> {
    let header = format!("[[{array}]]");
    let mut seen = 0usize;
    let mut header_line = None;
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            if header_line.is_some() {
                break;
            }
            if line.replace(' ', "") == header {
                if seen == index {
                    header_line = Some(number + 1);
                }
                seen += 1;
            }
            continue;
        }
        if header_line.is_some() {
            let name = line.split_once('=').map(|(name, _)| name.trim().trim_matches('"'));
            if name == Some(key) {
                return Some(number + 1);
            }
        }
    }
    header_line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[journal]
directory = "/var/lib/eventpi/journal"

[stack]
repository = "REPOSITORY"
branch = "device-0001"
checkout = "/srv/eventpi/stack"
"#;

    const HOST_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx7abcdefgh";

    fn parse(repository: &str, extra: &str) -> Result<Config, Vec<Problem>> {
        Config::parse(&format!("{}{extra}", BASE.replace("REPOSITORY", repository)))
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|problem| problem.key.as_str()).collect()
    }

    #[test]
    fn full_trust_config_parses() {
        let extra = format!(
            "\n[git]\nssh_key_file = \"/etc/eventpi/deploy_key\"\nssh_host_keys = [\"{HOST_KEY}\"]\nrequire_signed_commits = true\nallowed_signers_file = \"/var/lib/eventpi/allowed_signers\"\n\n[[registry]]\nhost = \"127.0.0.1:5000\"\nusername = \"device\"\npassword_file = \"/etc/eventpi/registry.password\"\n\n[[registry]]\nhost = \"ghcr.io\"\ndocker_config = \"/etc/eventpi/docker.json\"\n"
        );

        let config = parse("ssh://git@git.example.net:2222/fleet.git", &extra).unwrap();

        assert_eq!(config.registries.len(), 2);
        assert_eq!(config.registries[1].host, "ghcr.io");
        assert!(config.git.require_signed_commits);
        assert_eq!(config.git.ssh_host_keys, vec![HOST_KEY.to_string()]);
    }

    #[test]
    fn registry_problems_name_entry_and_line() {
        let extra = "\n[[registry]]\nhost = \"a.example\"\nusername = \"u\"\npassword_file = \"/p\"\n\n[[registry]]\nhost = \"b.example\"\nusername = \"u\"\n";

        let problems = parse("git://127.0.0.1/stack.git", extra).unwrap_err();

        assert_eq!(keys(&problems), vec!["registry[1].password_file"]);
        assert_eq!(problems[0].line, Some(15));
    }

    #[test]
    fn registry_unknown_key_is_reported() {
        let extra = "\n[[registry]]\nhost = \"a.example\"\npassword = \"s3cr3t\"\n";

        let problems = parse("git://127.0.0.1/stack.git", extra).unwrap_err();

        assert_eq!(keys(&problems), vec!["registry[0].password"]);
        assert_eq!(problems[0].line, Some(12));
        assert!(problems[0].message.contains("unknown key"), "{}", problems[0].message);
        assert!(!problems[0].message.contains("s3cr3t"), "{}", problems[0].message);
    }

    #[test]
    fn ssh_repository_needs_key_and_pinned_host_key() {
        let problems = parse("git@git.example.net:fleet.git", "").unwrap_err();

        assert_eq!(keys(&problems), vec!["git.ssh_host_keys", "git.ssh_key_file"]);
    }

    #[test]
    fn token_in_url_is_rejected_without_echo() {
        let problems = parse("https://oauth2:glpat-secret@git.example.net/fleet.git", "").unwrap_err();

        assert_eq!(keys(&problems), vec!["stack.repository"]);
        assert!(!problems[0].message.contains("glpat-secret"), "{}", problems[0].message);
        assert!(problems[0].message.contains("https://***@git.example.net/fleet.git"), "{}", problems[0].message);
    }

    #[test]
    fn token_over_plain_http_is_rejected() {
        let problems = parse("http://git.example.net/fleet.git", "\n[git]\nhttps_token_file = \"/etc/eventpi/token\"\n").unwrap_err();

        assert_eq!(keys(&problems), vec!["git.https_token_file"]);
        assert!(problems[0].message.contains("clear text"), "{}", problems[0].message);
    }

    #[test]
    fn signed_commits_need_a_list() {
        let problems = parse("git://127.0.0.1/stack.git", "\n[git]\nrequire_signed_commits = true\n").unwrap_err();

        assert_eq!(keys(&problems), vec!["git.allowed_signers_file"]);
    }

    #[test]
    fn ssh_url_with_port() {
        let transport = Transport::of("ssh://git@127.0.0.1:2222/srv/stack.git");

        assert_eq!(transport, Transport::Ssh { host: "127.0.0.1".into(), port: Some(2222) });
        assert_eq!(transport.known_hosts_pattern().as_deref(), Some("[127.0.0.1]:2222"));
    }

    #[test]
    fn scp_like_url_is_ssh_on_port_22() {
        let transport = Transport::of("git@git.example.net:fleet/stack.git");

        assert_eq!(transport, Transport::Ssh { host: "git.example.net".into(), port: None });
        assert_eq!(transport.known_hosts_pattern().as_deref(), Some("git.example.net"));
    }

    #[test]
    fn bracketed_ipv6_host() {
        let transport = Transport::of("ssh://git@[::1]:2200/stack.git");

        assert_eq!(transport.known_hosts_pattern().as_deref(), Some("[::1]:2200"));
    }

    #[test]
    fn other_schemes_and_paths() {
        assert_eq!(Transport::of("https://git.example.net/stack.git"), Transport::Https);
        assert_eq!(Transport::of("http://git.example.net/stack.git"), Transport::Http);
        assert_eq!(Transport::of("git://127.0.0.1:9418/stack.git"), Transport::Other);
        assert_eq!(Transport::of("/srv/git/stack.git"), Transport::Other);
        assert_eq!(Transport::of("./stack.git"), Transport::Other);
    }

    #[test]
    fn public_key_shape() {
        assert!(valid_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx7 host@example"));
        assert!(!valid_public_key("ssh-ed25519"));
        assert!(!valid_public_key("SHA256:abcdefabcdefabcdef"));
        assert!(!valid_public_key("ssh-dss AAAAB3NzaC1kc3MAAACBAP"));
    }

    #[test]
    fn array_key_line() {
        let text = "[[registry]]\nhost = \"a\"\n\n[[registry]]\nhost = \"b\"\nusername = \"u\"\n[stack]\nusername = 1\n";

        assert_eq!(line_of_array_key(text, "registry", 1, "username"), Some(6));
        assert_eq!(line_of_array_key(text, "registry", 0, "username"), Some(1));
        assert_eq!(line_of_array_key(text, "registry", 2, "host"), None);
    }
}

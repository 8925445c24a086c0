//! Image platforms (`os/arch[/variant]`) and how the engine and images name them.

use std::fmt;

/// An OCI platform such as `linux/arm64` or `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant`.
    pub fn parse(text: &str) -> Option<Platform> {
        let mut parts = text.split('/');
        let os = parts.next().filter(|part| !part.is_empty())?;
        let architecture = parts.next().filter(|part| !part.is_empty())?;
        let variant = parts.next().map(str::to_string);
        if parts.next().is_some() || variant.as_deref() == Some("") {
            return None;
        }
        Some(Platform { os: os.to_string(), architecture: architecture.to_string(), variant })
    }

    /// Builds the platform of an engine from `docker info`'s `OSType` and
    /// `Architecture` (a kernel name such as `x86_64`, `aarch64` or `armv7l`).
    pub fn from_engine(os_type: &str, kernel_architecture: &str) -> Platform {
        let (architecture, variant) = match kernel_architecture {
            "x86_64" | "amd64" => ("amd64", None),
            "aarch64" | "arm64" => ("arm64", None),
            "armv7l" | "armv7" | "armhf" => ("arm", Some("v7")),
            "armv6l" => ("arm", Some("v6")),
            "i386" | "i686" => ("386", None),
            other => (other, None),
        };
        Platform { os: os_type.to_string(), architecture: architecture.to_string(), variant: variant.map(str::to_string) }
    }

    /// Tells whether an image built for `image` runs here. A missing variant
    /// on either side matches, and `arm64` images match with or without `v8`.
    pub fn accepts(&self, image: &Platform) -> bool {
        if self.os != image.os || self.architecture != image.architecture {
            return false;
        }
        match (&self.variant, &image.variant) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_with_variant() {
        let platform = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(platform.variant.as_deref(), Some("v7"));
        assert_eq!(platform.to_string(), "linux/arm/v7");
    }

    #[test]
    fn parse_rejects_bad_text() {
        for text in ["", "linux", "linux/", "linux/arm/v7/x", "/arm64"] {
            assert_eq!(Platform::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn engine_names_map_to_oci_names() {
        assert_eq!(Platform::from_engine("linux", "aarch64").to_string(), "linux/arm64");
        assert_eq!(Platform::from_engine("linux", "armv7l").to_string(), "linux/arm/v7");
        assert_eq!(Platform::from_engine("linux", "x86_64").to_string(), "linux/amd64");
    }

    #[test]
    fn accepts_compares_architecture_and_variant() {
        let pi = Platform::parse("linux/arm/v7").unwrap();
        assert!(pi.accepts(&Platform::parse("linux/arm/v7").unwrap()));
        assert!(pi.accepts(&Platform::parse("linux/arm").unwrap()));
        assert!(!pi.accepts(&Platform::parse("linux/arm/v6").unwrap()));
        assert!(!pi.accepts(&Platform::parse("linux/arm64").unwrap()));
    }
}

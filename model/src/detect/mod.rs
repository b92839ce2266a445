//! Host detection: pure parsers over the texts of `/proc` and `/sys`, plus thin readers.
//!
//! Every reader takes a [`HostPaths`], so tests can point detection at a fake root directory
//! holding `proc/cpuinfo`, `proc/meminfo`, `sys/block/zram*/…` and `sys/bus/pci/devices/…`.
//! The compiler-target functions ([`isa_level`], [`gcc_target`], [`llvm_cpu_name`],
//! [`goamd64`]) work on any archspec microarchitecture, not just the host's.
//!
//! Only `/proc/cpuinfo` and `/proc/meminfo` are required; missing or unreadable zram and PCI
//! entries are skipped, since containers and minimal systems often lack them.

pub mod cpu;
pub mod gpu;
pub mod memory;
mod uarch;

pub use uarch::{compiler_flags, gcc_target, goamd64, isa_level, llvm_cpu_name, missing_features};

use std::io;
use std::path::{Path, PathBuf};

/// Where detection reads the host's `/proc` and `/sys` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    root: PathBuf,
}

impl HostPaths {
    /// Paths under `root`, which stands for `/` (a fake root in tests).
    pub fn new(root: impl Into<PathBuf>) -> HostPaths {
        HostPaths { root: root.into() }
    }

    /// The real host: paths under `/`.
    pub fn host() -> HostPaths {
        HostPaths::new("/")
    }

    /// `<root>/proc/cpuinfo`.
    pub fn cpuinfo(&self) -> PathBuf {
        self.root.join("proc/cpuinfo")
    }

    /// `<root>/proc/meminfo`.
    pub fn meminfo(&self) -> PathBuf {
        self.root.join("proc/meminfo")
    }

    /// `<root>/sys/block`, holding the `zram*` devices.
    pub fn block_devices(&self) -> PathBuf {
        self.root.join("sys/block")
    }

    /// `<root>/sys/bus/pci/devices`.
    pub fn pci_devices(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }
}

/// Why the host could not be detected.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// A required file could not be read.
    #[error("cannot detect the hardware: cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A required file lacks what detection needs.
    #[error(
        "cannot detect the hardware: {} {problem}; pin a profile instead \
         (see 'nix-tier profile --help')",
        path.display()
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is missing, e.g. "has no MemTotal line".
        problem: &'static str,
    },
}

/// Reads a required file.
fn read_required(path: &Path) -> Result<String, DetectError> {
    std::fs::read_to_string(path).map_err(|source| DetectError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The Nix system string for a Linux host whose Rust architecture name
/// (`std::env::consts::ARCH`) is `arch`: `x86_64-linux`, `aarch64-linux`, `i686-linux`, ….
pub fn nix_system(arch: &str) -> String {
    let nix_arch = match arch {
        "x86" => "i686",
        "arm" => "armv7l",
        "powerpc64" if cfg!(target_endian = "little") => "powerpc64le",
        other => other,
    };
    format!("{nix_arch}-linux")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_systems() {
        assert_eq!(nix_system("x86_64"), "x86_64-linux");
        assert_eq!(nix_system("aarch64"), "aarch64-linux");
        assert_eq!(nix_system("x86"), "i686-linux");
        assert_eq!(nix_system("riscv64"), "riscv64-linux");
    }

    #[test]
    fn missing_required_file_names_it() {
        let err = read_required(Path::new("/nonexistent/proc/cpuinfo")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/proc/cpuinfo"),
            "{err}"
        );
    }
}

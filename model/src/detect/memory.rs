//! Memory and swap from `/proc/meminfo`, zram devices from `/sys/block/zram*`.

use std::fs;

use super::{read_required, DetectError, HostPaths};
use crate::profile::Zram;

/// RAM and swap sizes from `/proc/meminfo`, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    /// `MemTotal`.
    pub total_mib: u64,
    /// `SwapTotal` (0 when absent).
    pub swap_total_mib: u64,
}

/// Reads `<root>/proc/meminfo`.
pub fn read_meminfo(paths: &HostPaths) -> Result<MemInfo, DetectError> {
    let path = paths.meminfo();
    let text = read_required(&path)?;
    meminfo_from_text(&text).ok_or(DetectError::Malformed {
        path,
        problem: "has no readable MemTotal line",
    })
}

/// Parses the text of `/proc/meminfo` (`MemTotal:  24683656 kB`); `None` without `MemTotal`.
pub fn meminfo_from_text(text: &str) -> Option<MemInfo> {
    let kib = |key: &str| {
        text.lines().find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            if name.trim() != key {
                return None;
            }
            let mut words = rest.split_whitespace();
            let value: u64 = words.next()?.parse().ok()?;
            match words.next() {
                Some("kB") | None => Some(value),
                Some(_) => None,
            }
        })
    };
    Some(MemInfo {
        total_mib: kib("MemTotal")? / 1024,
        swap_total_mib: kib("SwapTotal").unwrap_or(0) / 1024,
    })
}

/// The configured zram devices under `<root>/sys/block` (those with a nonzero `disksize`),
/// sorted by name; unreadable entries are skipped.
pub fn read_zram(paths: &HostPaths) -> Vec<Zram> {
    let Ok(entries) = fs::read_dir(paths.block_devices()) else {
        return Vec::new();
    };
    let mut devices: Vec<Zram> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let device = entry.file_name().into_string().ok()?;
            if !device.starts_with("zram") {
                return None;
            }
            let dir = entry.path();
            let disksize = fs::read_to_string(dir.join("disksize")).ok()?;
            let algorithms = fs::read_to_string(dir.join("comp_algorithm")).unwrap_or_default();
            zram_from_texts(&device, &disksize, &algorithms)
        })
        .collect();
    devices.sort_by(|a, b| a.device.cmp(&b.device));
    devices
}

/// A zram device from the texts of its `disksize` (bytes) and `comp_algorithm` (the
/// selected algorithm in brackets: `lzo lzo-rle lz4 [zstd]`); `None` when unconfigured.
pub fn zram_from_texts(device: &str, disksize: &str, comp_algorithm: &str) -> Option<Zram> {
    let bytes: u64 = disksize.trim().parse().ok()?;
    if bytes == 0 {
        return None;
    }
    let algorithm = comp_algorithm.split_whitespace().find_map(|word| {
        word.strip_prefix('[')
            .and_then(|word| word.strip_suffix(']'))
            .map(str::to_string)
    });
    Some(Zram {
        device: device.to_string(),
        size_mib: bytes / (1024 * 1024),
        algorithm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24683656 kB\n\
                           MemFree:        24428632 kB\n\
                           SwapCached:            0 kB\n\
                           SwapTotal:       8388604 kB\n\
                           SwapFree:        8388604 kB\n";

    #[test]
    fn meminfo_totals() {
        assert_eq!(
            meminfo_from_text(MEMINFO),
            Some(MemInfo {
                total_mib: 24105,
                swap_total_mib: 8191
            })
        );
    }

    #[test]
    fn meminfo_without_memtotal() {
        assert_eq!(meminfo_from_text("MemFree: 12 kB\n"), None);
        assert_eq!(meminfo_from_text("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn zram_texts() {
        let zram = zram_from_texts("zram0", "8589934592\n", "lzo lzo-rle lz4 [zstd]\n");
        assert_eq!(
            zram,
            Some(Zram {
                device: "zram0".into(),
                size_mib: 8192,
                algorithm: Some("zstd".into())
            })
        );
        assert_eq!(zram_from_texts("zram1", "0\n", "[lzo-rle] lz4\n"), None);
    }
}

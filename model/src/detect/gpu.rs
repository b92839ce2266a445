//! GPUs from the PCI devices in `/sys/bus/pci/devices`.

use std::fs;
use std::path::Path;

use super::HostPaths;
use crate::profile::Gpu;

/// The display controllers (PCI class `0x03xxxx`) under `<root>/sys/bus/pci/devices`,
/// sorted by PCI address; unreadable devices are skipped.
pub fn read_gpus(paths: &HostPaths) -> Vec<Gpu> {
    let Ok(entries) = fs::read_dir(paths.pci_devices()) else {
        return Vec::new();
    };
    let mut devices: Vec<(String, Gpu)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let address = entry.file_name().into_string().ok()?;
            let gpu = gpu_from_device_dir(&entry.path())?;
            Some((address, gpu))
        })
        .collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    devices.into_iter().map(|(_, gpu)| gpu).collect()
}

/// The GPU in one PCI device directory, `None` when it is not a display controller.
fn gpu_from_device_dir(dir: &Path) -> Option<Gpu> {
    let read = |name: &str| fs::read_to_string(dir.join(name)).ok();
    let driver = fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|target| Some(target.file_name()?.to_str()?.to_string()));
    gpu_from_texts(&read("class")?, &read("vendor")?, &read("device")?, driver)
}

/// A GPU from the texts of a PCI device's `class`, `vendor` and `device` files (`0x030000`,
/// `0x10de`, `0x2684`) and its driver's name; `None` unless the class is `0x03xxxx`.
pub fn gpu_from_texts(
    class: &str,
    vendor: &str,
    device: &str,
    driver: Option<String>,
) -> Option<Gpu> {
    let class = u32::from_str_radix(hex_digits(class)?, 16).ok()?;
    if class >> 16 != 0x03 {
        return None;
    }
    let vendor_id = hex_digits(vendor)?.to_ascii_lowercase();
    let device_id = hex_digits(device)?.to_ascii_lowercase();
    let vendor_name = match vendor_id.as_str() {
        "10de" => "nvidia",
        "1002" => "amd",
        "8086" => "intel",
        other => other,
    };
    Some(Gpu {
        vendor: vendor_name.to_string(),
        driver,
        pci_id: format!("{vendor_id}:{device_id}"),
    })
}

/// The hex digits of a sysfs value such as `0x10de\n`.
fn hex_digits(text: &str) -> Option<&str> {
    let text = text.trim();
    let digits = text.strip_prefix("0x").unwrap_or(text);
    (!digits.is_empty() && digits.chars().all(|c| c.is_ascii_hexdigit())).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_controllers_only() {
        let gpu = gpu_from_texts("0x030000\n", "0x10de\n", "0x2684\n", Some("nvidia".into()));
        assert_eq!(
            gpu,
            Some(Gpu {
                vendor: "nvidia".into(),
                driver: Some("nvidia".into()),
                pci_id: "10de:2684".into()
            })
        );
        assert_eq!(
            gpu_from_texts("0x020000\n", "0x1af4\n", "0x1041\n", None),
            None
        );
        let virtio = gpu_from_texts("0x038000", "0x1AF4", "0x1050", None);
        assert_eq!(
            virtio.map(|g| (g.vendor, g.pci_id)),
            Some(("1af4".into(), "1af4:1050".into()))
        );
    }
}

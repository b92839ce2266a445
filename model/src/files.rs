//! Reading files whose names come from users or from Nix without trusting what is there: a
//! FIFO would block the reader, a device (`/dev/zero`) or a huge file would exhaust its memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Reads the regular file at `path` (symlinks are followed), at most `limit` bytes. It is
/// opened without blocking, so a FIFO, a device or a directory is refused at once.
pub fn read_regular(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)?;
    read_opened(file, limit)
}

/// Reads `file`, which must be a regular file of at most `limit` bytes.
pub fn read_opened(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = match () {
            _ if kind.is_dir() => "a directory",
            _ if kind.is_fifo() => "a FIFO",
            _ if kind.is_char_device() || kind.is_block_device() => "a device",
            _ if kind.is_socket() => "a socket",
            _ => "not a regular file",
        };
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("is {what}, not a regular file")));
    }
    let too_large = || io::Error::new(io::ErrorKind::InvalidData, format!("is larger than {limit} bytes"));
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "abc").unwrap();
        assert_eq!(read_regular(&file, 3).unwrap(), b"abc");
        assert!(read_regular(&file, 2).unwrap_err().to_string().contains("larger than 2 bytes"));
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        // Returns at once instead of waiting for a writer.
        assert!(read_regular(&fifo, 10).unwrap_err().to_string().contains("a FIFO"));
        assert!(read_regular(Path::new("/dev/zero"), 10).unwrap_err().to_string().contains("a device"));
        assert!(read_regular(dir.path(), 10).unwrap_err().to_string().contains("a directory"));
    }
}

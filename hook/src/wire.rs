//! Nix's worker-protocol serialisation, as the build hook sees it: integers are u64
//! little-endian; a string is its length, its bytes and zero padding to a multiple of 8; a
//! string collection is a count followed by the strings (libutil/serialise.cc).

use std::io::{self, Read, Write};

/// Reads one u64.
pub fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    input.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// Longest string accepted: guards against a corrupt length allocating gigabytes.
const MAX_STRING: u64 = 64 << 20;

/// Reads one string (store paths and setting values are UTF-8; other bytes are replaced).
pub fn read_string(input: &mut impl Read) -> io::Result<String> {
    let len = read_u64(input)?;
    if len > MAX_STRING {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("string of {len} bytes")));
    }
    let padded = len.div_ceil(8) * 8;
    let mut buf = vec![0u8; padded as usize];
    input.read_exact(&mut buf)?;
    buf.truncate(len as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads a string collection.
pub fn read_strings(input: &mut impl Read) -> io::Result<Vec<String>> {
    let count = read_u64(input)?;
    (0..count).map(|_| read_string(input)).collect()
}

/// Writes one u64.
pub fn write_u64(output: &mut impl Write, value: u64) -> io::Result<()> {
    output.write_all(&value.to_le_bytes())
}

/// Writes one string with its padding.
pub fn write_string(output: &mut impl Write, value: &str) -> io::Result<()> {
    write_u64(output, value.len() as u64)?;
    output.write_all(value.as_bytes())?;
    let padding = (8 - value.len() % 8) % 8;
    output.write_all(&[0u8; 8][..padding])
}

/// Writes a string collection.
pub fn write_strings<'a>(output: &mut impl Write, values: impl ExactSizeIterator<Item = &'a str>) -> io::Result<()> {
    write_u64(output, values.len() as u64)?;
    for value in values {
        write_string(output, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_with_padding() {
        for text in ["", "a", "try", "exactly8", "/nix/store/abc-nine.drv"] {
            let mut buf = Vec::new();
            write_string(&mut buf, text).unwrap();
            assert_eq!(buf.len() % 8, 0, "{text:?} padded");
            assert_eq!(read_string(&mut buf.as_slice()).unwrap(), text);
        }
        let mut buf = Vec::new();
        write_strings(&mut buf, ["big-parallel", "kvm"].into_iter()).unwrap();
        assert_eq!(read_strings(&mut buf.as_slice()).unwrap(), ["big-parallel", "kvm"]);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        write_string(&mut buf, "truncated string").unwrap();
        buf.truncate(12);
        assert!(read_string(&mut buf.as_slice()).is_err());
        let huge = u64::MAX.to_le_bytes();
        assert!(read_string(&mut huge.as_slice()).is_err());
    }
}

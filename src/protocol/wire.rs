//! The SSH wire encoding's basic types as keyholder writes and reads them
//! by hand: `string` and `mpint` (RFC 4251, section 5), for the signature
//! blobs a backend builds and the few bodies parsed without ssh-encoding.
//!
//! Never panics and never reads past its input: a length that does not fit
//! is a `None`.

/// Appends `string bytes` (a `uint32` length, then the bytes).
pub fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Appends an `mpint` of a non-negative big-endian number, as OpenSSH writes
/// it: no leading zero bytes, one 0x00 before a set high bit.
pub fn put_mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
    let start = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len());
    let digits = magnitude.get(start..).unwrap_or_default();
    let pad = digits.first().is_some_and(|&b| b & 0x80 != 0);
    let len = digits.len() + usize::from(pad);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    if pad {
        out.push(0);
    }
    out.extend_from_slice(digits);
}

/// Takes one `string` off the front of `reader`; `None` if it is cut short.
pub fn take_string<'a>(reader: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = reader.split_first_chunk::<4>()?;
    let (value, rest) = rest.split_at_checked(usize::try_from(u32::from_be_bytes(*len)).ok()?)?;
    *reader = rest;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_mpints_as_openssh_writes_them() {
        let mut out = Vec::new();
        put_string(&mut out, b"ab");
        assert_eq!(out, [0, 0, 0, 2, b'a', b'b']);
        let mut reader = out.as_slice();
        assert_eq!(take_string(&mut reader), Some(&b"ab"[..]));
        assert!(reader.is_empty());
        assert_eq!(take_string(&mut &[0u8, 0, 0, 3, 1][..]), None);
        assert_eq!(take_string(&mut &[0u8, 0][..]), None);
        for (magnitude, wire) in [
            (&[0u8, 0, 0x7f][..], &[0u8, 0, 0, 1, 0x7f][..]),
            (&[0x80], &[0, 0, 0, 2, 0, 0x80]),
            (&[0, 0], &[0, 0, 0, 0]),
            (&[], &[0, 0, 0, 0]),
        ] {
            let mut out = Vec::new();
            put_mpint(&mut out, magnitude);
            assert_eq!(out, wire, "{magnitude:?}");
        }
    }
}

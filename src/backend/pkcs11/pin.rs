//! The token's user PIN, kept so that a token that comes back is logged in
//! again without a human: in one fixed buffer locked into memory (`mlock`,
//! on top of the daemon's `mlockall`), wiped when forgotten. It is never
//! logged, never formatted, never copied except into the short-lived
//! zeroizing buffer `C_Login` reads.

use std::ptr::NonNull;

use zeroize::Zeroize;

/// PINs longer than this are refused (PKCS#11 tokens use far shorter ones).
pub const MAX_PIN: usize = 256;

/// A kept PIN.
pub struct Pin {
    buf: Box<[u8; MAX_PIN]>,
    len: usize,
    locked: bool,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(…)")
    }
}

impl Pin {
    /// Keeps `pin`; `Err` when it is empty or longer than [`MAX_PIN`].
    pub fn new(pin: &[u8]) -> Result<Self, String> {
        if pin.is_empty() {
            return Err("the PIN is empty".into());
        }
        if pin.len() > MAX_PIN {
            return Err(format!("the PIN is longer than {MAX_PIN} bytes"));
        }
        let mut buf = Box::new([0u8; MAX_PIN]);
        let locked = NonNull::new(buf.as_mut_ptr().cast::<std::ffi::c_void>()).is_some_and(|p| {
            // SAFETY: the range is the boxed buffer, alive as long as self.
            unsafe { nix::sys::mman::mlock(p, MAX_PIN) }.is_ok()
        });
        if let Some(dst) = buf.get_mut(..pin.len()) {
            dst.copy_from_slice(pin);
        }
        Ok(Self {
            buf,
            len: pin.len(),
            locked,
        })
    }

    /// The PIN's bytes.
    pub fn expose(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.buf.zeroize();
        if self.locked {
            if let Some(p) = NonNull::new(self.buf.as_mut_ptr().cast::<std::ffi::c_void>()) {
                // SAFETY: the same range as locked in `new`.
                let _ = unsafe { nix::sys::mman::munlock(p, MAX_PIN) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_bytes_and_refuses_empty_or_long_pins() {
        let pin = Pin::new(b"1234").unwrap();
        assert_eq!(pin.expose(), b"1234");
        assert_eq!(format!("{pin:?}"), "Pin(…)");
        assert!(Pin::new(b"").is_err());
        assert!(Pin::new(&[b'1'; MAX_PIN + 1]).is_err());
        assert_eq!(Pin::new(&[b'1'; MAX_PIN]).unwrap().expose().len(), MAX_PIN);
    }
}

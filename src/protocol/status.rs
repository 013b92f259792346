//! The `status@keyholder` vendor extension: the daemon tells any local user
//! which configured keys exist and which are armed (loaded in the upstream
//! agent). No secrets: names, fingerprints, and booleans.
//!
//! Request: SSH_AGENTC_EXTENSION, `string "status@keyholder"`, no contents.
//! Answer: SSH_AGENT_EXTENSION_RESPONSE (29), `string "status@keyholder"`, then
//!
//! ```text
//! uint32  format version (1)
//! boolean upstream agent reachable
//! uint32  number of keys, then for each:
//!   string  key name
//!   string  SHA256 fingerprint
//!   boolean armed
//! ```

use ssh_encoding::{CheckedSum, Decode, Encode, Reader, Writer};

/// The extension's name.
pub const NAME: &str = "status@keyholder";
/// The payload format version.
pub const VERSION: u32 = 1;

/// One configured key's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyStatus {
    /// The key's configured name.
    pub name: String,
    /// `SHA256:…`
    pub fingerprint: String,
    /// Loaded in the upstream agent.
    pub armed: bool,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// Whether the upstream agent answered.
    pub upstream_reachable: bool,
    /// Every configured key, in configuration order.
    pub keys: Vec<KeyStatus>,
}

impl Encode for StatusReport {
    fn encoded_len(&self) -> ssh_encoding::Result<usize> {
        let mut sizes = vec![4, 1, 4];
        for k in &self.keys {
            sizes.push(k.name.encoded_len()?);
            sizes.push(k.fingerprint.encoded_len()?);
            sizes.push(1);
        }
        sizes.checked_sum()
    }

    fn encode(&self, w: &mut impl Writer) -> ssh_encoding::Result<()> {
        VERSION.encode(w)?;
        u8::from(self.upstream_reachable).encode(w)?;
        u32::try_from(self.keys.len())
            .map_err(|_| ssh_encoding::Error::Length)?
            .encode(w)?;
        for k in &self.keys {
            k.name.encode(w)?;
            k.fingerprint.encode(w)?;
            u8::from(k.armed).encode(w)?;
        }
        Ok(())
    }
}

impl Decode for StatusReport {
    type Error = ssh_encoding::Error;

    fn decode(r: &mut impl Reader) -> ssh_encoding::Result<Self> {
        if u32::decode(r)? != VERSION {
            return Err(ssh_encoding::Error::Length);
        }
        let upstream_reachable = u8::decode(r)? != 0;
        let n = u32::decode(r)?;
        let mut keys = Vec::new();
        for _ in 0..n {
            keys.push(KeyStatus {
                name: String::decode(r)?,
                fingerprint: String::decode(r)?,
                armed: u8::decode(r)? != 0,
            });
        }
        Ok(Self {
            upstream_reachable,
            keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = StatusReport {
            upstream_reachable: true,
            keys: vec![KeyStatus {
                name: "deploy".into(),
                fingerprint: "SHA256:x".into(),
                armed: true,
            }],
        };
        let mut buf = Vec::new();
        s.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), s.encoded_len().unwrap());
        assert_eq!(StatusReport::decode(&mut &buf[..]).unwrap(), s);
        assert!(StatusReport::decode(&mut &buf[..buf.len() - 1]).is_err());
    }
}

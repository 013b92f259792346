//! The `status@keyholder` vendor extension: the daemon tells any local user
//! which configured keys exist and which are armed (loaded in the upstream
//! agent), and, when asked, its counters (see [`Metrics`]). No secrets:
//! names, fingerprints, booleans and counts; never a uid or a user name.
//!
//! Request: SSH_AGENTC_EXTENSION, `string "status@keyholder"`, then either
//! no contents (format 1, what every `keyholder status` sends) or
//! `uint32 2` (format 2: format 1 plus the counters; sent by
//! `keyholder status --prometheus`). A daemon that predates format 2 ignores
//! the contents and answers format 1, which the client handles; a client
//! that predates it never asks, and gets format 1 byte for byte as before.
//! Answer: SSH_AGENT_EXTENSION_RESPONSE (29), `string "status@keyholder"`, then
//!
//! ```text
//! uint32  format version (1 or 2)
//! boolean upstream agent reachable
//! uint32  number of keys, then for each:
//!   string  key name
//!   string  SHA256 fingerprint
//!   boolean armed
//! -- format 3 only (asked with `uint32 3`, sent by `keyholder status`):
//! uint32  number of notes, then for each:
//!   string  one line from the backend naming what is wrong (a token not
//!           present, not logged in, a key not found or not matching)
//! -- format 2 only:
//! string  the daemon's version
//! uint32  number of metric families, then for each:
//!   string  name (`keyholder_…`)
//!   string  type (`counter` or `gauge`)
//!   string  help text
//!   uint32  number of samples, then for each:
//!     uint32  number of labels, then for each: string name, string value
//!     uint64  value
//! ```
//!
//! Families are self-describing so that a daemon can add counters without a
//! new format: a client prints what it gets (after checking names).

use ssh_encoding::{CheckedSum, Decode, Encode, Reader, Writer};

/// The extension's name.
pub const NAME: &str = "status@keyholder";
/// The payload format version without counters.
pub const VERSION: u32 = 1;
/// The payload format version with counters ([`Metrics`]).
pub const VERSION_METRICS: u32 = 2;
/// The payload format version with the backend's notes.
pub const VERSION_NOTES: u32 = 3;

/// The request contents that ask for format 3.
pub fn notes_request() -> Vec<u8> {
    VERSION_NOTES.to_be_bytes().to_vec()
}

/// The answer format a `status@keyholder` request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Format 1: keys, armed or not, the backend reachable or not.
    Plain,
    /// Format 2: and the daemon's counters.
    Metrics,
    /// Format 3: and the backend's notes on what is wrong.
    Notes,
}

impl Format {
    /// The format the request contents ask for: `uint32 2` the counters,
    /// `uint32 3` the notes, anything else format 1.
    pub fn of(contents: &[u8]) -> Self {
        if contents == VERSION_METRICS.to_be_bytes() {
            Self::Metrics
        } else if contents == VERSION_NOTES.to_be_bytes() {
            Self::Notes
        } else {
            Self::Plain
        }
    }
}

/// The request contents that ask for format 2.
pub fn metrics_request() -> Vec<u8> {
    VERSION_METRICS.to_be_bytes().to_vec()
}

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
        self.encode_body(w)
    }
}

impl StatusReport {
    /// Everything after the version.
    fn encode_body(&self, w: &mut impl Writer) -> ssh_encoding::Result<()> {
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
        Self::decode_body(r)
    }
}

impl StatusReport {
    fn decode_body(r: &mut impl Reader) -> ssh_encoding::Result<Self> {
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

/// The daemon's counters (format 2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// The daemon's version (`CARGO_PKG_VERSION` of the running binary).
    pub daemon_version: String,
    /// Metric families, each named once.
    pub families: Vec<Family>,
}

/// Seconds with six decimals, from microseconds (a histogram's bucket
/// bounds and sum are sent in microseconds, written in seconds).
pub fn seconds(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

/// One metric family: a name, its type, help, and its samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// `keyholder_…`
    pub name: String,
    /// `counter`, `gauge` or `histogram` (kept as sent: a client checks
    /// it). A histogram's samples are its buckets (an `le` label), its sum
    /// in microseconds (`stat="sum"`) and its count (`stat="count"`).
    pub kind: String,
    /// One line of help.
    pub help: String,
    /// The samples, each with its own label set.
    pub samples: Vec<Sample>,
}

/// One sample of a family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Label names and values, in order.
    pub labels: Vec<(String, String)>,
    /// The value (every keyholder metric is a whole number).
    pub value: u64,
}

/// A whole answer: the report, and the counters when format 2 was asked
/// for. Without counters it encodes to exactly the format-1 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Keys and the upstream agent.
    pub report: StatusReport,
    /// The counters (format 2), or `None` (format 1).
    pub metrics: Option<Metrics>,
    /// The backend's notes (format 3, never with counters), or `None`.
    pub notes: Option<Vec<String>>,
}

fn len_u32(n: usize) -> ssh_encoding::Result<u32> {
    u32::try_from(n).map_err(|_| ssh_encoding::Error::Length)
}

impl Encode for Metrics {
    fn encoded_len(&self) -> ssh_encoding::Result<usize> {
        let mut sizes = vec![self.daemon_version.encoded_len()?, 4];
        for f in &self.families {
            sizes.push(f.name.encoded_len()?);
            sizes.push(f.kind.encoded_len()?);
            sizes.push(f.help.encoded_len()?);
            sizes.push(4);
            for s in &f.samples {
                sizes.push(4 + 8);
                for (k, v) in &s.labels {
                    sizes.push(k.encoded_len()?);
                    sizes.push(v.encoded_len()?);
                }
            }
        }
        sizes.checked_sum()
    }

    fn encode(&self, w: &mut impl Writer) -> ssh_encoding::Result<()> {
        self.daemon_version.encode(w)?;
        len_u32(self.families.len())?.encode(w)?;
        for f in &self.families {
            f.name.encode(w)?;
            f.kind.encode(w)?;
            f.help.encode(w)?;
            len_u32(f.samples.len())?.encode(w)?;
            for s in &f.samples {
                len_u32(s.labels.len())?.encode(w)?;
                for (k, v) in &s.labels {
                    k.encode(w)?;
                    v.encode(w)?;
                }
                s.value.encode(w)?;
            }
        }
        Ok(())
    }
}

impl Decode for Metrics {
    type Error = ssh_encoding::Error;

    // Counts come from the wire: nothing is reserved for them up front; each
    // element consumes bytes, so the frame cap bounds the loops.
    fn decode(r: &mut impl Reader) -> ssh_encoding::Result<Self> {
        let daemon_version = String::decode(r)?;
        let mut families = Vec::new();
        for _ in 0..u32::decode(r)? {
            let name = String::decode(r)?;
            let kind = String::decode(r)?;
            let help = String::decode(r)?;
            let mut samples = Vec::new();
            for _ in 0..u32::decode(r)? {
                let mut labels = Vec::new();
                for _ in 0..u32::decode(r)? {
                    labels.push((String::decode(r)?, String::decode(r)?));
                }
                samples.push(Sample {
                    labels,
                    value: u64::decode(r)?,
                });
            }
            families.push(Family {
                name,
                kind,
                help,
                samples,
            });
        }
        Ok(Self {
            daemon_version,
            families,
        })
    }
}

impl Encode for Answer {
    fn encoded_len(&self) -> ssh_encoding::Result<usize> {
        match (&self.metrics, &self.notes) {
            (Some(m), _) => [self.report.encoded_len()?, m.encoded_len()?].checked_sum(),
            (None, Some(notes)) => {
                let mut sizes = vec![self.report.encoded_len()?, 4];
                for n in notes {
                    sizes.push(n.encoded_len()?);
                }
                sizes.checked_sum()
            }
            (None, None) => self.report.encoded_len(),
        }
    }

    fn encode(&self, w: &mut impl Writer) -> ssh_encoding::Result<()> {
        match (&self.metrics, &self.notes) {
            (Some(m), _) => {
                VERSION_METRICS.encode(w)?;
                self.report.encode_body(w)?;
                m.encode(w)
            }
            (None, Some(notes)) => {
                VERSION_NOTES.encode(w)?;
                self.report.encode_body(w)?;
                len_u32(notes.len())?.encode(w)?;
                for n in notes {
                    n.encode(w)?;
                }
                Ok(())
            }
            (None, None) => self.report.encode(w),
        }
    }
}

impl Decode for Answer {
    type Error = ssh_encoding::Error;

    /// Format 1, 2 or 3.
    fn decode(r: &mut impl Reader) -> ssh_encoding::Result<Self> {
        match u32::decode(r)? {
            VERSION => Ok(Self {
                report: StatusReport::decode_body(r)?,
                metrics: None,
                notes: None,
            }),
            VERSION_METRICS => Ok(Self {
                report: StatusReport::decode_body(r)?,
                metrics: Some(Metrics::decode(r)?),
                notes: None,
            }),
            VERSION_NOTES => {
                let report = StatusReport::decode_body(r)?;
                let mut notes = Vec::new();
                for _ in 0..u32::decode(r)? {
                    notes.push(String::decode(r)?);
                }
                Ok(Self {
                    report,
                    metrics: None,
                    notes: Some(notes),
                })
            }
            _ => Err(ssh_encoding::Error::Length),
        }
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

    fn report() -> StatusReport {
        StatusReport {
            upstream_reachable: true,
            keys: vec![KeyStatus {
                name: "deploy".into(),
                fingerprint: "SHA256:x".into(),
                armed: false,
            }],
        }
    }

    fn encoded(value: &impl Encode) -> Vec<u8> {
        let mut buf = Vec::new();
        value.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), value.encoded_len().unwrap());
        buf
    }

    #[test]
    fn an_answer_without_counters_is_format_1_byte_for_byte() {
        let answer = Answer {
            report: report(),
            metrics: None,
            notes: None,
        };
        let bytes = encoded(&answer);
        assert_eq!(bytes, encoded(&report()));
        // What a client that predates format 2 decodes.
        assert_eq!(StatusReport::decode(&mut &bytes[..]).unwrap(), report());
        assert_eq!(Answer::decode(&mut &bytes[..]).unwrap(), answer);
    }

    #[test]
    fn an_answer_with_counters_round_trips() {
        let answer = Answer {
            report: report(),
            metrics: Some(Metrics {
                daemon_version: "0.1.0".into(),
                families: vec![Family {
                    name: "keyholder_signatures_total".into(),
                    kind: "counter".into(),
                    help: "Signatures.".into(),
                    samples: vec![Sample {
                        labels: vec![("key".into(), "deploy".into())],
                        value: u64::MAX,
                    }],
                }],
            }),
            notes: None,
        };
        let bytes = encoded(&answer);
        assert_eq!(&bytes[..4], &[0, 0, 0, 2]);
        assert_eq!(Answer::decode(&mut &bytes[..]).unwrap(), answer);
        // An older client refuses it (it never asks for it).
        assert!(StatusReport::decode(&mut &bytes[..]).is_err());
        for cut in 0..bytes.len() {
            assert!(Answer::decode(&mut &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn an_answer_with_notes_round_trips() {
        for notes in [
            vec![],
            vec!["token \"kh\" is not present".to_owned(), "b: x".into()],
        ] {
            let answer = Answer {
                report: report(),
                metrics: None,
                notes: Some(notes),
            };
            let bytes = encoded(&answer);
            assert_eq!(&bytes[..4], &[0, 0, 0, 3]);
            assert_eq!(Answer::decode(&mut &bytes[..]).unwrap(), answer);
            for cut in 0..bytes.len() {
                assert!(Answer::decode(&mut &bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn only_the_exact_contents_ask_for_counters_or_notes() {
        assert_eq!(Format::of(&metrics_request()), Format::Metrics);
        assert_eq!(Format::of(&[]), Format::Plain);
        assert_eq!(Format::of(&[0, 0, 0, 1]), Format::Plain);
        assert_eq!(Format::of(&[0, 0, 0, 2, 0]), Format::Plain);
        assert_eq!(Format::of(&notes_request()), Format::Notes);
        assert_eq!(Format::of(&[0, 0, 0, 3, 0]), Format::Plain);
    }
}

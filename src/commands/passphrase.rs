//! Where `keyholder arm` gets passphrases from, in this order:
//! 1. `--passphrase-file FILE` (its first line);
//! 2. `$CREDENTIALS_DIRECTORY/keyholder-passphrase`, when that variable is
//!    set and the file exists (systemd `LoadCredential=`/
//!    `LoadCredentialEncrypted=`);
//! 3. the controlling terminal (`/dev/tty`), with echo off.
//!
//! Passphrases live in zeroizing buffers allocated once at their final size,
//! so no copy is left behind in freed memory. While echo is off, SIGINT,
//! SIGTERM, SIGHUP and SIGQUIT are caught just long enough to restore the
//! terminal; the signal is then re-raised with its previous disposition.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The credential name under `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL: &str = "keyholder-passphrase";
/// Longest passphrase accepted (from a file or the terminal).
const MAX_PASSPHRASE: usize = 4096;

/// A passphrase; its bytes are wiped when it is dropped.
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Whether nothing was entered.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl AsRef<[u8]> for Passphrase {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// Where passphrases come from.
#[derive(Debug)]
pub enum Source {
    /// One passphrase from a file (option or credential); never asks again.
    Fixed {
        /// The passphrase.
        passphrase: Passphrase,
        /// The file it came from, for messages.
        origin: PathBuf,
    },
    /// The terminal: asks, and asks again.
    Terminal(Tty),
    /// No source: why, for the message.
    Unavailable(String),
}

impl Source {
    /// Picks the source: the option's file (which must be readable), else
    /// the systemd credential if present, else the terminal.
    pub fn choose(passphrase_file: Option<&Path>) -> Result<Self> {
        if let Some(path) = passphrase_file {
            return Ok(Self::Fixed {
                passphrase: read_file(path)?,
                origin: path.to_owned(),
            });
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join(CREDENTIAL);
            if path.exists() {
                return Ok(Self::Fixed {
                    passphrase: read_file(&path)?,
                    origin: path,
                });
            }
        }
        match Tty::open() {
            Ok(tty) => Ok(Self::Terminal(tty)),
            Err(e) => Ok(Self::Unavailable(format!(
                "no passphrase source: no terminal (/dev/tty: {e}), no --passphrase-file, \
                 and no $CREDENTIALS_DIRECTORY/{CREDENTIAL}"
            ))),
        }
    }
}

/// Reads the first line of `path` (without its line ending). The file
/// must pass the trust check for secrets (root's alone, a regular file).
pub fn read_file(path: &Path) -> Result<Passphrase> {
    let file = path.display();
    let content = crate::trust::read_secret(path)
        .map_err(|e| Error::msg(format!("passphrase file {file}: {e}")))?;
    let line_len = content
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(content.len());
    if line_len > MAX_PASSPHRASE {
        return Err(Error::msg(format!(
            "passphrase file {file}: first line longer than {MAX_PASSPHRASE} bytes"
        )));
    }
    let mut line = content.get(..line_len).unwrap_or_default();
    if let Some(stripped) = line.strip_suffix(b"\r") {
        line = stripped;
    }
    let mut passphrase = Zeroizing::new(Vec::with_capacity(line.len()));
    passphrase.extend_from_slice(line);
    Ok(Passphrase(passphrase))
}

/// The controlling terminal.
#[derive(Debug)]
pub struct Tty(File);

/// The signal caught while echo was off (0: none).
static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: nix::libc::c_int) {
    CAUGHT.store(signal, Ordering::SeqCst);
}

/// Signals that end a prompt (the terminal is restored first).
const PROMPT_SIGNALS: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

impl Tty {
    /// Opens `/dev/tty`; fails when the process has no controlling terminal.
    pub fn open() -> std::io::Result<Self> {
        File::options()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .map(Self)
    }

    /// Writes a message to the terminal.
    pub fn say(&self, message: &str) {
        let _ = write_all(&self.0, message.as_bytes());
    }

    /// Shows `prompt` and reads one line with echo off.
    pub fn prompt(&self, prompt: &str) -> Result<Passphrase> {
        CAUGHT.store(0, Ordering::SeqCst);
        let result = {
            let _handlers = Handlers::install();
            // Echo off first (which discards input typed ahead, and echoed),
            // then the prompt: what is typed after it is never shown.
            let _echo = EchoOff::new(&self.0)?;
            write_all(&self.0, prompt.as_bytes())
                .map_err(|e| Error::msg(format!("/dev/tty: cannot write: {e}")))
                .and_then(|()| read_line(&self.0))
        };
        // Echo was off, so the user's Enter did not move to a new line.
        self.say("\n");
        let caught = CAUGHT.swap(0, Ordering::SeqCst);
        if caught != 0 {
            if let Ok(sig) = Signal::try_from(caught) {
                // The previous disposition is back: for the default one,
                // this ends the process as the signal would have.
                let _ = signal::raise(sig);
            }
            return Err(Error::msg("interrupted"));
        }
        result
    }
}

/// Writes everything, retrying short writes and EINTR.
fn write_all(file: &File, mut bytes: &[u8]) -> nix::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(file.as_fd(), bytes) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads up to a newline (or end of input), one byte at a time, into a
/// buffer that never reallocates. A caught signal ends the read.
fn read_line(file: &File) -> Result<Passphrase> {
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE));
    let mut byte = Zeroizing::new([0u8; 1]);
    loop {
        match nix::unistd::read(file.as_fd(), &mut byte[..]) {
            Ok(0) => break,
            Ok(_) => {
                let [b] = *byte;
                if b == b'\n' || b == b'\r' {
                    break;
                }
                if line.len() >= MAX_PASSPHRASE {
                    return Err(Error::msg(format!(
                        "passphrase longer than {MAX_PASSPHRASE} bytes"
                    )));
                }
                line.push(b);
            }
            Err(Errno::EINTR) => {
                if CAUGHT.load(Ordering::SeqCst) != 0 {
                    return Err(Error::msg("interrupted"));
                }
            }
            Err(e) => return Err(Error::msg(format!("/dev/tty: cannot read: {e}"))),
        }
    }
    Ok(Passphrase(line))
}

/// Terminal echo off for as long as this lives.
struct EchoOff<'a> {
    file: &'a File,
    saved: Termios,
}

impl<'a> EchoOff<'a> {
    fn new(file: &'a File) -> Result<Self> {
        let saved = termios::tcgetattr(file.as_fd())
            .map_err(|e| Error::msg(format!("/dev/tty: cannot read terminal settings: {e}")))?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        quiet.local_flags.remove(LocalFlags::ECHONL);
        termios::tcsetattr(file.as_fd(), SetArg::TCSAFLUSH, &quiet)
            .map_err(|e| Error::msg(format!("/dev/tty: cannot turn echo off: {e}")))?;
        Ok(Self { file, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.file.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Catching handlers (without SA_RESTART, so a blocked read returns EINTR)
/// for as long as this lives; the previous ones are restored on drop.
struct Handlers(Vec<(Signal, SigAction)>);

impl Handlers {
    fn install() -> Self {
        let catch = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for sig in PROMPT_SIGNALS {
            // SAFETY: `on_signal` only stores into an atomic, which is
            // async-signal-safe; the previous action is restored on drop.
            if let Ok(old) = unsafe { signal::sigaction(sig, &catch) } {
                previous.push((sig, old));
            }
        }
        Self(previous)
    }
}

impl Drop for Handlers {
    fn drop(&mut self) {
        for (sig, old) in self.0.drain(..) {
            // SAFETY: reinstates the action that was in place before.
            let _ = unsafe { signal::sigaction(sig, &old) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(content: &[u8]) -> (PathBuf, Result<Passphrase>) {
        let path =
            std::env::temp_dir().join(format!("kh-pass-{}-{}", std::process::id(), content.len()));
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let p = read_file(&path);
        std::fs::remove_file(&path).unwrap();
        (path, p)
    }

    #[test]
    fn first_line_without_its_ending() {
        assert_eq!(file_with(b"secret\n").1.unwrap().as_ref(), b"secret");
        assert_eq!(
            file_with(b"s3cret\r\nsecond\n").1.unwrap().as_ref(),
            b"s3cret"
        );
        assert_eq!(file_with(b"no newline").1.unwrap().as_ref(), b"no newline");
        assert!(file_with(b"").1.unwrap().is_empty());
        assert_eq!(file_with(b" spaced \n").1.unwrap().as_ref(), b" spaced ");
    }

    #[test]
    fn overlong_and_missing_files_are_errors_naming_the_file() {
        let (path, p) = file_with(&vec![b'x'; MAX_PASSPHRASE + 10]);
        let e = p.unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        let e = read_file(Path::new("/nonexistent/kh-pass"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kh-pass"), "{e}");
    }
}

//! The PKCS#11 module and the one token the backend uses: loading and
//! initialising the module, finding the token (by label or slot id),
//! logging in with the user PIN, finding each configured key's private
//! object and checking that it is the key of `NAME.pub`, noticing that the
//! token is gone and logging in again with the kept PIN once it is back.
//!
//! Concurrency: everything about the module sits behind one read-write lock.
//! Signing sessions take it shared for the length of one token call, so a
//! re-initialisation (`C_Finalize` + `C_Initialize`, taken exclusively) never
//! runs under a call in progress, and a session opened before it is never
//! used (or closed: its handle may have been reused) after it. The module is
//! initialised with `CKF_OS_LOCKING_OK`: several sessions sign at once.
//!
//! A PIN is tried when an admin gives it, and once more only when the token
//! comes back after being gone; a PIN the token refuses is forgotten at once
//! and never tried again by itself (real tokens lock after a few tries).
//! Nothing here logs the PIN, or anything the token would not show anyone.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism as CkMechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use ssh_key::public::KeyData;

use super::key::{self, Mechanism, SigningKey};
use super::pin::Pin;
use crate::config::pkcs11::{ObjectSelector, TokenSelector};

/// One configured key, as the backend looks for it on the token.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// The key's configured name.
    pub name: String,
    /// Its private object's label or id.
    pub object: ObjectSelector,
    /// `NAME.pub`.
    pub public: KeyData,
}

/// Where the token stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// No such token in the module (never found, or gone).
    Missing,
    /// Present, not logged in (no PIN given yet, or disarmed).
    NotLoggedIn,
    /// Came back, and the kept PIN was refused (and forgotten): one line why.
    PinRefused(String),
    /// Logged in.
    LoggedIn,
}

/// A key that can sign now.
#[derive(Debug)]
pub struct Armed {
    /// The private object.
    pub handle: ObjectHandle,
    /// Its configured public key, mechanism choice and verifier.
    pub signer: Arc<SigningKey>,
    /// Why the key could leave the token (extractable, not sensitive).
    pub warning: Option<String>,
}

/// One configured key's state.
#[derive(Debug, Clone)]
pub enum KeyState {
    /// Found, matching `NAME.pub`.
    Armed(Arc<Armed>),
    /// Not usable, and why (one line).
    NotArmed(String),
}

struct State {
    ctx: Pkcs11,
    initialized: bool,
    /// Bumped at every `C_Initialize`: sessions of an older epoch are dead.
    epoch: u64,
    slot: Option<Slot>,
    condition: Condition,
    keys: Vec<KeyState>,
    /// The session that holds the login (a login lasts while one session
    /// of the application stays open). Only used under the write lock.
    admin: Mutex<Option<Session>>,
}

/// The module, the token and the kept PIN.
pub struct Token {
    module: PathBuf,
    selector: TokenSelector,
    specs: Vec<KeySpec>,
    signers: Vec<Option<Arc<SigningKey>>>,
    state: RwLock<State>,
    pin: Mutex<Option<Pin>>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.module)
            .field("token", &self.selector)
            .finish_non_exhaustive()
    }
}

/// A PKCS#11 error as one line ("CKR_PIN_INCORRECT in C_Login").
pub fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{} in C_{function:?}", rv_name(*rv)),
        other => other.to_string(),
    }
}

fn rv_name(rv: RvError) -> String {
    // RvError's Debug is its CamelCase name; OpenSSH and the spec say
    // CKR_SCREAMING_CASE.
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Whether an error means the token (or the module's view of it) is gone:
/// the backend stops signing and looks for it again.
pub fn is_gone(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::GeneralError,
            _
        )
    )
}

fn mechanism(m: Mechanism) -> CkMechanism<'static> {
    match m {
        Mechanism::Eddsa => CkMechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        Mechanism::Ecdsa => CkMechanism::Ecdsa,
        Mechanism::Sha1RsaPkcs => CkMechanism::Sha1RsaPkcs,
        Mechanism::Sha256RsaPkcs => CkMechanism::Sha256RsaPkcs,
        Mechanism::Sha512RsaPkcs => CkMechanism::Sha512RsaPkcs,
    }
}

/// A signing session owned by one worker thread.
#[derive(Default)]
pub struct WorkerSession {
    session: Option<(u64, Session)>,
}

impl std::fmt::Debug for WorkerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerSession")
    }
}

/// Why a signature was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignFailure {
    /// The token is not usable now (missing, not logged in); why.
    NotReady(String),
    /// The key is not armed (or not configured); why.
    NotArmed(String),
    /// The token failed the call; `gone` when it looks removed.
    Token { why: String, gone: bool },
    /// The token answered something that is not a valid signature.
    Bad(String),
}

impl std::fmt::Display for SignFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotReady(why) | Self::NotArmed(why) | Self::Bad(why) => f.write_str(why),
            Self::Token { why, .. } => f.write_str(why),
        }
    }
}

impl Token {
    /// Loads and initialises the module and looks for the token (a token
    /// not there yet is not an error: the backend waits for it). `Err` is
    /// one line: the module cannot be loaded or is not a PKCS#11 module.
    pub fn open(
        module: &Path,
        selector: TokenSelector,
        specs: Vec<KeySpec>,
    ) -> Result<Self, String> {
        // The module runs as root in the daemon: it must be a trusted file.
        // A symbolic link (Debian ships some module paths as links) is
        // resolved first; the file checked is the one loaded (through its
        // open descriptor, so it cannot be swapped in between).
        let real = std::fs::canonicalize(module)
            .map_err(|e| format!("{}: cannot load the PKCS#11 module: {e}", module.display()))?;
        let (file, _) = crate::trust::open(&real, crate::trust::Access::Public).map_err(|e| {
            format!(
                "{}: the PKCS#11 module {} is not trusted: {e}",
                module.display(),
                real.display()
            )
        })?;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let loaded = Pkcs11::new(&by_fd);
        drop(file);
        let ctx = loaded.map_err(|e| match e {
            CkError::LibraryLoading(e) => {
                format!("{}: cannot load the PKCS#11 module: {e}", module.display())
            }
            CkError::MissingSymbol(s) => {
                format!("{}: not a PKCS#11 module (no {s} symbol)", module.display())
            }
            other => format!(
                "{}: not a usable PKCS#11 module: {}",
                module.display(),
                describe(&other)
            ),
        })?;
        let signers = specs
            .iter()
            .map(|s| SigningKey::new(&s.public).ok().map(Arc::new))
            .collect();
        let token = Self {
            module: module.to_owned(),
            selector,
            specs,
            signers,
            state: RwLock::new(State {
                ctx,
                initialized: false,
                epoch: 0,
                slot: None,
                condition: Condition::Missing,
                keys: Vec::new(),
                admin: Mutex::new(None),
            }),
            pin: Mutex::new(None),
        };
        {
            let mut state = token.write();
            token.initialize(&mut state).map_err(|e| {
                format!(
                    "{}: the PKCS#11 module failed to initialise: {e}",
                    module.display()
                )
            })?;
            token.find_slot(&mut state);
            token.reset_keys(&mut state);
        }
        Ok(token)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured module path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// How the token is named in log lines: `token "LABEL"` or `slot N`.
    pub fn name(&self) -> String {
        match &self.selector {
            TokenSelector::Label(l) => format!("token {l:?}"),
            TokenSelector::Slot(s) => format!("the token in slot {s}"),
        }
    }

    /// `C_Initialize` (after `C_Finalize` when it was initialised), which
    /// invalidates every session: the epoch moves on.
    fn initialize(&self, state: &mut State) -> Result<(), String> {
        if let Ok(mut admin) = state.admin.lock() {
            // Dead after C_Finalize anyway; never closed (its handle may be
            // reused by the next initialisation).
            if let Some(session) = admin.take() {
                std::mem::forget(session);
            }
        }
        if state.initialized {
            let _ = state.ctx.clone().finalize();
            state.initialized = false;
        }
        state.epoch += 1;
        state.slot = None;
        match state
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                state.initialized = true;
                Ok(())
            }
            Err(e) => Err(describe(&e)),
        }
    }

    /// Looks for the configured token; sets `slot` and the condition.
    fn find_slot(&self, state: &mut State) {
        state.slot = None;
        let slots = match state.ctx.get_slots_with_token() {
            Ok(s) => s,
            Err(_) => {
                state.condition = Condition::Missing;
                return;
            }
        };
        let found: Vec<Slot> = slots
            .into_iter()
            .filter(|slot| match &self.selector {
                TokenSelector::Slot(id) => slot.id() == *id,
                TokenSelector::Label(label) => state
                    .ctx
                    .get_token_info(*slot)
                    .is_ok_and(|i| i.label().trim_end() == label),
            })
            .collect();
        if found.len() > 1 {
            tracing::error!(
                "pkcs11: {} slots hold a token labelled as configured ({}); using the first \
                 (give each token its own label, or set slot)",
                found.len(),
                self.name()
            );
        }
        state.slot = found.first().copied();
        state.condition = if state.slot.is_some() {
            Condition::NotLoggedIn
        } else {
            Condition::Missing
        };
    }

    fn reset_keys(&self, state: &mut State) {
        let why = match &state.condition {
            Condition::Missing => format!("{} is not present", self.name()),
            Condition::NotLoggedIn => format!("{} is not logged in (arm it)", self.name()),
            Condition::PinRefused(why) => why.clone(),
            Condition::LoggedIn => String::new(),
        };
        state.keys = self
            .specs
            .iter()
            .map(|_| KeyState::NotArmed(why.clone()))
            .collect();
    }

    /// The token's PIN retry flags, for the line about a refused PIN.
    fn pin_flags(state: &State) -> String {
        let Some(slot) = state.slot else {
            return "retry state unknown".into();
        };
        match state.ctx.get_token_info(slot) {
            Ok(info) => {
                let mut flags = Vec::new();
                if info.user_pin_locked() {
                    flags.push("CKF_USER_PIN_LOCKED");
                }
                if info.user_pin_final_try() {
                    flags.push("CKF_USER_PIN_FINAL_TRY");
                }
                if info.user_pin_count_low() {
                    flags.push("CKF_USER_PIN_COUNT_LOW");
                }
                if flags.is_empty() {
                    "retry state: no retry flag set".into()
                } else {
                    format!("retry state: {}", flags.join(" "))
                }
            }
            Err(e) => format!("retry state unknown ({})", describe(&e)),
        }
    }

    /// Logs in with `pin` on a new session that then holds the login.
    fn login(&self, state: &mut State, pin: &Pin) -> Result<(), String> {
        let slot = state
            .slot
            .ok_or_else(|| format!("{} is not present", self.name()))?;
        let session = state
            .ctx
            .open_ro_session(slot)
            .map_err(|e| format!("{}: cannot open a session: {}", self.name(), describe(&e)))?;
        let raw = RawAuthPin::new(Box::new(pin.expose().to_vec()));
        match session.login_with_raw(UserType::User, &raw) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                *state.admin.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
                state.condition = Condition::LoggedIn;
                Ok(())
            }
            Err(e @ CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => {
                Err(format!(
                    "{}: the PIN was refused ({}; {}); it is not tried again",
                    self.name(),
                    describe(&e),
                    Self::pin_flags(state)
                ))
            }
            Err(e) => Err(format!("{}: login failed: {}", self.name(), describe(&e))),
        }
    }

    /// Logs in with the PIN an admin gave and arms the keys. Idempotent:
    /// a token already logged in keeps its login (and the PIN that made it)
    /// and its keys are looked up again. `Err`: one line, already
    /// naming the token (a refused PIN is forgotten).
    pub fn arm(&self, pin: &[u8]) -> Result<(), String> {
        let pin = Pin::new(pin)?;
        let mut state = self.write();
        if state.condition == Condition::Missing || !state.initialized {
            // Maybe it is back (or was inserted) since the last look.
            self.initialize(&mut state)?;
            self.find_slot(&mut state);
        }
        match state.condition {
            Condition::Missing => {
                self.reset_keys(&mut state);
                return Err(format!("{} is not present", self.name()));
            }
            Condition::LoggedIn => {
                tracing::info!(
                    "pkcs11: {} is already logged in; keys looked up again",
                    self.name()
                );
            }
            Condition::NotLoggedIn | Condition::PinRefused(_) => {
                if let Err(why) = self.login(&mut state, &pin) {
                    // A refused PIN stays in status until the next arm.
                    state.condition = if why.contains("the PIN was refused") {
                        Condition::PinRefused(why.clone())
                    } else {
                        Condition::NotLoggedIn
                    };
                    self.reset_keys(&mut state);
                    return Err(why);
                }
                *self.pin.lock().unwrap_or_else(|e| e.into_inner()) = Some(pin);
            }
        }
        self.find_keys(&mut state);
        Ok(())
    }

    /// Logs out, closes the sessions' login and forgets the PIN.
    pub fn disarm(&self) {
        self.pin.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut state = self.write();
        if let Some(session) = state.admin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = session.logout();
            drop(session);
        }
        if state.condition != Condition::Missing {
            state.condition = Condition::NotLoggedIn;
        }
        self.reset_keys(&mut state);
    }

    /// Finds every configured key's private object and checks it against
    /// `NAME.pub`, logging each key that is not armed (with why).
    fn find_keys(&self, state: &mut State) {
        let admin = state.admin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(session) = admin.as_ref() else {
            drop(admin);
            self.reset_keys(state);
            return;
        };
        let mut keys = Vec::with_capacity(self.specs.len());
        for (spec, signer) in self.specs.iter().zip(&self.signers) {
            let found = match signer {
                Some(signer) => self.find_key(session, spec, signer),
                None => Err(format!(
                    "{}: {} keys cannot be used with a PKCS#11 token",
                    spec.name,
                    spec.public.algorithm()
                )),
            };
            match found {
                Ok(armed) => {
                    tracing::info!(
                        "pkcs11: key {} armed ({} on {})",
                        spec.name,
                        key::fingerprint(&spec.public),
                        self.name()
                    );
                    if let Some(warning) = &armed.warning {
                        tracing::warn!("pkcs11: key {}: {warning}", spec.name);
                    }
                    keys.push(KeyState::Armed(Arc::new(armed)));
                }
                Err(why) => {
                    tracing::error!("pkcs11: key {} not armed: {why}", spec.name);
                    keys.push(KeyState::NotArmed(why));
                }
            }
        }
        drop(admin);
        state.keys = keys;
    }

    fn object_name(spec: &KeySpec) -> String {
        match &spec.object {
            ObjectSelector::Label(l) => format!("CKA_LABEL {l:?}"),
            ObjectSelector::Id(id) => format!("CKA_ID {}", hex(id)),
        }
    }

    fn find_key(
        &self,
        session: &Session,
        spec: &KeySpec,
        signer: &Arc<SigningKey>,
    ) -> Result<Armed, String> {
        let what = Self::object_name(spec);
        let selector = match &spec.object {
            ObjectSelector::Label(l) => Attribute::Label(l.as_bytes().to_vec()),
            ObjectSelector::Id(id) => Attribute::Id(id.clone()),
        };
        let token_err =
            |e: CkError| format!("looking for {what} on {}: {}", self.name(), describe(&e));
        let found = session
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), selector.clone()])
            .map_err(token_err)?;
        let handle = match found.as_slice() {
            [] => return Err(format!("no private key with {what} on {}", self.name())),
            [one] => *one,
            many => {
                return Err(format!(
                    "{} private keys with {what} on {}: ambiguous (set pkcs11_id)",
                    many.len(),
                    self.name()
                ))
            }
        };
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::Id,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(token_err)?;
        let mut token_public = public_of(&attrs);
        if token_public.is_none() {
            // EC private objects often carry no point: the public object
            // with the same id (or label) does.
            let id = attrs.iter().find_map(|a| match a {
                Attribute::Id(id) if !id.is_empty() => Some(Attribute::Id(id.clone())),
                _ => None,
            });
            let pair = id.unwrap_or(selector);
            if let Ok(publics) =
                session.find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), pair])
            {
                if let [one] = publics.as_slice() {
                    if let Ok(attrs) = session.get_attributes(
                        *one,
                        &[
                            AttributeType::KeyType,
                            AttributeType::EcParams,
                            AttributeType::EcPoint,
                            AttributeType::Modulus,
                            AttributeType::PublicExponent,
                        ],
                    ) {
                        token_public = public_of(&attrs);
                    }
                }
            }
        }
        let want = key::fingerprint(&spec.public);
        match token_public {
            Some(Ok(public)) if public == spec.public => {}
            Some(Ok(public)) => {
                return Err(format!(
                    "the private key with {what} on {} is {} {}, but {}.pub is {} {want}",
                    self.name(),
                    public.algorithm(),
                    key::fingerprint(&public),
                    spec.name,
                    spec.public.algorithm()
                ))
            }
            other => {
                // No readable public half: a signature checked against
                // NAME.pub decides.
                let note = match other {
                    Some(Err(why)) => format!("its public key cannot be read ({why})"),
                    _ => "no public key object pairs with it".to_owned(),
                };
                let data = b"keyholder: does this token key match NAME.pub?";
                let prepared = signer.prepare(data, 2)?;
                let raw = session
                    .sign(&mechanism(prepared.mechanism), handle, &prepared.input)
                    .map_err(|e| {
                        format!(
                            "the private key with {what} on {} cannot sign ({}); {note}",
                            self.name(),
                            describe(&e)
                        )
                    })?;
                signer.finish(&prepared, data, &raw).map_err(|e| {
                    format!(
                        "the private key with {what} on {} is not the key of {}.pub ({want}): \
                         {e}; {note}",
                        self.name(),
                        spec.name
                    )
                })?;
            }
        }
        let mut leaks = Vec::new();
        for a in &attrs {
            match a {
                Attribute::Extractable(true) => leaks.push("extractable (CKA_EXTRACTABLE)"),
                Attribute::Sensitive(false) => leaks.push("not sensitive (CKA_SENSITIVE false)"),
                _ => {}
            }
        }
        let warning = (!leaks.is_empty()).then(|| {
            format!(
                "the private key with {what} on {} is {}: it can be read out of the token \
                 (generate it on the token, sensitive and not extractable)",
                self.name(),
                leaks.join(" and ")
            )
        });
        Ok(Armed {
            handle,
            signer: Arc::clone(signer),
            warning,
        })
    }

    /// Each configured key's state, in configuration order, and the token's.
    pub fn report(&self) -> (Condition, Vec<KeyState>) {
        let state = self.read();
        (state.condition.clone(), state.keys.clone())
    }

    /// Whether signing can be attempted at all.
    pub fn ready(&self) -> bool {
        self.read().condition == Condition::LoggedIn
    }

    /// Signs `data` with configured key `index` on this worker's session
    /// and returns the checked SSH signature blob.
    pub fn sign(
        &self,
        worker: &mut WorkerSession,
        index: usize,
        data: &[u8],
        flags: u32,
    ) -> Result<Vec<u8>, SignFailure> {
        let state = self.read();
        if state.condition != Condition::LoggedIn {
            return Err(SignFailure::NotReady(match &state.condition {
                Condition::Missing => format!("{} is not present", self.name()),
                Condition::PinRefused(why) => why.clone(),
                _ => format!("{} is not logged in (arm it)", self.name()),
            }));
        }
        let armed = match state.keys.get(index) {
            Some(KeyState::Armed(a)) => Arc::clone(a),
            Some(KeyState::NotArmed(why)) => return Err(SignFailure::NotArmed(why.clone())),
            None => return Err(SignFailure::NotArmed("not a configured key".into())),
        };
        let slot = state
            .slot
            .ok_or_else(|| SignFailure::NotReady(format!("{} is not present", self.name())))?;
        let prepared = armed
            .signer
            .prepare(data, flags)
            .map_err(SignFailure::Bad)?;
        let fail = |e: CkError| SignFailure::Token {
            why: format!("{}: {}", self.name(), describe(&e)),
            gone: is_gone(&e),
        };
        if worker
            .session
            .as_ref()
            .is_some_and(|(epoch, _)| *epoch != state.epoch)
        {
            // Opened before a C_Finalize: dead, and its handle may be reused.
            if let Some((_, old)) = worker.session.take() {
                std::mem::forget(old);
            }
        }
        if worker.session.is_none() {
            let session = state.ctx.open_ro_session(slot).map_err(fail)?;
            worker.session = Some((state.epoch, session));
        }
        let Some((_, session)) = worker.session.as_ref() else {
            return Err(SignFailure::NotReady("no session".into()));
        };
        let raw = session
            .sign(
                &mechanism(prepared.mechanism),
                armed.handle,
                &prepared.input,
            )
            .map_err(|e| {
                let failure = fail(e);
                if let SignFailure::Token { gone: true, .. } = failure {
                    // Never reused: the monitor re-initialises if it is gone.
                    if let Some((_, old)) = worker.session.take() {
                        std::mem::forget(old);
                    }
                }
                failure
            });
        drop(state);
        let raw = raw?;
        armed
            .signer
            .finish(&prepared, data, &raw)
            .map_err(|e| SignFailure::Bad(format!("{}: {e}", self.name())))
    }

    /// Closes a worker's session (when its thread ends).
    pub fn close(&self, worker: &mut WorkerSession) {
        let state = self.read();
        if let Some((epoch, session)) = worker.session.take() {
            if epoch == state.epoch && state.initialized {
                drop(session);
            } else {
                std::mem::forget(session);
            }
        }
    }

    /// Checks that a logged-in token is still there; `false` when it is gone
    /// (the caller then calls [`Token::recover`]).
    pub fn probe(&self) -> bool {
        let state = self.read();
        match (&state.condition, state.slot) {
            (Condition::Missing, _) | (_, None) => false,
            (Condition::LoggedIn, Some(_)) => {
                let admin = state.admin.lock().unwrap_or_else(|e| e.into_inner());
                let Some(session) = admin.as_ref() else {
                    return false;
                };
                if session.get_session_info().is_err() {
                    return false;
                }
                // Reading an attribute of an armed key reaches the token.
                state.keys.iter().all(|k| match k {
                    KeyState::Armed(a) => !matches!(
                        session.get_attributes(a.handle, &[AttributeType::Class]),
                        Err(ref e) if is_gone(e)
                    ),
                    KeyState::NotArmed(_) => true,
                })
            }
            (_, Some(slot)) => state.ctx.get_token_info(slot).is_ok(),
        }
    }

    /// Marks the token gone (signs fail at once from now on); logs it once.
    pub fn lost(&self, why: &str) {
        let mut state = self.write();
        if state.condition == Condition::Missing {
            return;
        }
        tracing::error!(
            "pkcs11: {} is gone ({why}); signs fail until it is back",
            self.name()
        );
        state.condition = Condition::Missing;
        state.slot = None;
        self.reset_keys(&mut state);
    }

    /// While the token is missing: re-initialises the module (the only way
    /// some modules see a token again), looks for it, and logs in with the
    /// kept PIN (once: a refused PIN is forgotten). `true` when it is back.
    pub fn recover(&self) -> bool {
        let mut state = self.write();
        if state.condition != Condition::Missing {
            return true;
        }
        if let Err(e) = self.initialize(&mut state) {
            tracing::debug!("pkcs11: re-initialising the module failed: {e}");
            return false;
        }
        self.find_slot(&mut state);
        if state.condition == Condition::Missing {
            return false;
        }
        let pin = self.pin.lock().unwrap_or_else(|e| e.into_inner()).take();
        match pin {
            None => {
                tracing::warn!(
                    "pkcs11: {} is present; not logged in (no PIN kept: arm it)",
                    self.name()
                );
                self.reset_keys(&mut state);
            }
            Some(pin) => match self.login(&mut state, &pin) {
                Ok(()) => {
                    tracing::info!(
                        "pkcs11: {} is back; logged in again with the kept PIN",
                        self.name()
                    );
                    *self.pin.lock().unwrap_or_else(|e| e.into_inner()) = Some(pin);
                    self.find_keys(&mut state);
                }
                Err(why) => {
                    tracing::error!("pkcs11: {} is back, but {why}; arm it again", self.name());
                    state.condition = Condition::PinRefused(why);
                    self.reset_keys(&mut state);
                }
            },
        }
        true
    }

    /// Whether the token is missing now.
    pub fn missing(&self) -> bool {
        self.read().condition == Condition::Missing
    }

    /// Finalises the module (at shutdown): logs out, forgets the PIN.
    pub fn finish(&self) {
        self.disarm();
        let mut state = self.write();
        if let Ok(mut admin) = state.admin.lock() {
            admin.take();
        }
        if state.initialized {
            let _ = state.ctx.clone().finalize();
            state.initialized = false;
        }
        state.epoch += 1;
    }
}

fn public_of(attrs: &[Attribute]) -> Option<Result<KeyData, String>> {
    let mut kind = None;
    let (mut params, mut point, mut modulus, mut exponent) = (None, None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(k) => kind = Some(*k),
            Attribute::EcParams(v) => params = Some(v.as_slice()),
            Attribute::EcPoint(v) => point = Some(v.as_slice()),
            Attribute::Modulus(v) => modulus = Some(v.as_slice()),
            Attribute::PublicExponent(v) => exponent = Some(v.as_slice()),
            _ => {}
        }
    }
    match kind {
        Some(k) if k == KeyType::RSA => Some(key::rsa_public(modulus?, exponent?)),
        Some(k) if k == KeyType::EC || k == KeyType::EC_EDWARDS => {
            Some(key::ec_public(params?, point?))
        }
        Some(k) => Some(Err(format!("key type {k} is not supported"))),
        None => None,
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

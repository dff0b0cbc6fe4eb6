//! Credentials sealed into the configuration file with AES-256-GCM, so a
//! config can carry a password without carrying it in clear. Keys come from
//! the environment (`WEIR_SEAL_KEYS`), each with a version: a sealed value
//! names the version that sealed it, so after a rotation the older keys still
//! open older values while `weir seal` uses the newest.
//!
//! Sealed form: `weir-sealed:v<N>:<base64 of 12-byte nonce, then ciphertext and tag>`.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Environment variable holding the keys: `v1=<base64 32 bytes>,v2=<...>`.
pub const KEYS_ENV: &str = "WEIR_SEAL_KEYS";
const PREFIX: &str = "weir-sealed:v";
const NONCE: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("{KEYS_ENV} is not set; it holds the keys that open sealed passwords (v1=<base64 key>,...)")]
    NoKeys,
    /// Names the entry by its place only: its text may hold a key.
    #[error("{KEYS_ENV} is malformed in its entry {0} (counting from 1): expected v<N>=<base64 of 32 bytes>, comma-separated")]
    BadKeys(usize),
    /// Two keys of one version: sealing would take one and opening the other.
    #[error("{KEYS_ENV} holds two keys of version v{0}: give each key a version of its own")]
    DuplicateVersion(u32),
    #[error("not a sealed value: expected weir-sealed:v<N>:<base64> from `weir seal`")]
    Malformed,
    #[error("the value was sealed with key v{0}, which {KEYS_ENV} does not hold")]
    UnknownVersion(u32),
    #[error("the value does not open with key v{0}: a different key of that version, or altered text")]
    Undecryptable(u32),
}

/// The keys by version, from `WEIR_SEAL_KEYS`'s text.
pub fn parse_keys(text: &str) -> Result<Vec<(u32, [u8; 32])>, SealError> {
    let mut keys = Vec::new();
    for (i, part) in text.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
        let bad = || SealError::BadKeys(i + 1);
        let (version, key) = part.split_once('=').ok_or_else(bad)?;
        let version: u32 = version.strip_prefix('v').and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let key: [u8; 32] = STANDARD
            .decode(key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(bad)?;
        if keys.iter().any(|(v, _)| *v == version) {
            return Err(SealError::DuplicateVersion(version));
        }
        keys.push((version, key));
    }
    if keys.is_empty() {
        return Err(SealError::NoKeys);
    }
    Ok(keys)
}

fn env_keys() -> Result<Vec<(u32, [u8; 32])>, SealError> {
    parse_keys(&std::env::var(KEYS_ENV).map_err(|_| SealError::NoKeys)?)
}

/// Seals `secret` with the newest key (the highest version).
pub fn seal_with(keys: &[(u32, [u8; 32])], secret: &str) -> Result<String, SealError> {
    let (version, key) = keys.iter().max_by_key(|(v, _)| *v).ok_or(SealError::NoKeys)?;
    let nonce: [u8; NONCE] = rand::random();
    let cipher = Aes256Gcm::new(key.into());
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), secret.as_bytes())
        .map_err(|_| SealError::Undecryptable(*version))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(format!("{PREFIX}{version}:{}", STANDARD.encode(out)))
}

/// Opens a value `seal_with` made, with the key of the version it names.
pub fn open_with(keys: &[(u32, [u8; 32])], sealed: &str) -> Result<String, SealError> {
    let rest = sealed.trim().strip_prefix(PREFIX).ok_or(SealError::Malformed)?;
    let (version, body) = rest.split_once(':').ok_or(SealError::Malformed)?;
    let version: u32 = version.parse().map_err(|_| SealError::Malformed)?;
    let bytes = STANDARD.decode(body).map_err(|_| SealError::Malformed)?;
    if bytes.len() <= NONCE {
        return Err(SealError::Malformed);
    }
    let (_, key) = keys
        .iter()
        .find(|(v, _)| *v == version)
        .ok_or(SealError::UnknownVersion(version))?;
    let (nonce, ciphertext) = bytes.split_at(NONCE);
    let plain = Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), ciphertext)
        .map_err(|_| SealError::Undecryptable(version))?;
    String::from_utf8(plain).map_err(|_| SealError::Undecryptable(version))
}

/// Seals with the keys in the environment.
pub fn seal(secret: &str) -> Result<String, SealError> {
    seal_with(&env_keys()?, secret)
}

/// Opens with the keys in the environment.
pub fn open(sealed: &str) -> Result<String, SealError> {
    open_with(&env_keys()?, sealed)
}

/// A fresh random key, as `WEIR_SEAL_KEYS` takes it.
pub fn generate_key() -> String {
    STANDARD.encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Anything in password_sealed opens or is refused; never a panic.
        #[test]
        fn any_sealed_text_opens_or_errs(text in "(weir-sealed:v[0-9]{1,3}:)?[A-Za-z0-9+/=]{0,120}") {
            let _ = open_with(&[(1, [7u8; 32])], &text);
        }
    }

    fn keys(text: &str) -> Vec<(u32, [u8; 32])> {
        parse_keys(text).expect("keys")
    }

    #[test]
    fn sealed_values_open_and_do_not_contain_the_secret() {
        let k = keys(&format!("v1={}", generate_key()));
        let sealed = seal_with(&k, "s3cret-password").expect("seal");
        assert!(sealed.starts_with("weir-sealed:v1:"));
        assert!(!sealed.contains("s3cret"));
        assert_ne!(
            sealed,
            seal_with(&k, "s3cret-password").expect("seal"),
            "a fresh nonce each time"
        );
        assert_eq!(open_with(&k, &sealed).as_deref(), Ok("s3cret-password"));
    }

    #[test]
    fn after_rotation_old_values_open_and_new_ones_use_the_newest_key() {
        let (old, new) = (generate_key(), generate_key());
        let before = keys(&format!("v1={old}"));
        let sealed_v1 = seal_with(&before, "pw").expect("seal");
        let after = keys(&format!("v2={new}, v1={old}"));
        assert_eq!(open_with(&after, &sealed_v1).as_deref(), Ok("pw"));
        let sealed_v2 = seal_with(&after, "pw").expect("seal");
        assert!(sealed_v2.starts_with("weir-sealed:v2:"));
        // Once v1 is retired, values it sealed say so.
        let retired = keys(&format!("v2={new}"));
        assert_eq!(open_with(&retired, &sealed_v1), Err(SealError::UnknownVersion(1)));
    }

    #[test]
    fn wrong_keys_and_altered_text_are_refused_clearly() {
        let k = keys(&format!("v1={}", generate_key()));
        let other = keys(&format!("v1={}", generate_key()));
        let sealed = seal_with(&k, "pw").expect("seal");
        assert_eq!(open_with(&other, &sealed), Err(SealError::Undecryptable(1)));
        let mut altered = sealed.clone();
        altered.pop();
        altered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(open_with(&k, &altered).is_err());
        assert_eq!(open_with(&k, "plain-password"), Err(SealError::Malformed));
        assert_eq!(open_with(&k, "weir-sealed:v1:AAAA"), Err(SealError::Malformed));
        assert!(matches!(parse_keys("v1=short"), Err(SealError::BadKeys(1))));
        let key = STANDARD.encode([7u8; 32]);
        let other = STANDARD.encode([8u8; 32]);
        assert_eq!(
            parse_keys(&format!("v1={key},v1={other}")),
            Err(SealError::DuplicateVersion(1))
        );
        // A key pasted without its version, or after a colon: the error never repeats the text.
        let key = STANDARD.encode([7u8; 32]);
        for entry in [key.clone(), format!("v1:{key}")] {
            let text = format!("v2={key},{entry}");
            let e = parse_keys(&text).expect_err("malformed").to_string();
            assert!(e.contains("entry 2") && !e.contains(&key[..20]), "{e}");
        }
        assert_eq!(parse_keys(""), Err(SealError::NoKeys));
    }
}

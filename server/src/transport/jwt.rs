//! Bearer JWTs from one trusted issuer: the signature (with the one
//! configured algorithm, so a token cannot choose a weaker one), `iss`,
//! `aud`, `exp` and `nbf`, then the claim that names the tenant.

use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::JwtConfig;

pub struct JwtVerifier {
    /// Every key a token may be signed with: `public_key_file` may hold
    /// several PEM blocks, so that an issuer's new key can be trusted
    /// before its tokens appear and its old one after they stop.
    keys: Vec<DecodingKey>,
    /// SHA-256 of each key's material, to tell which keys a reload kept.
    key_hashes: Vec<[u8; 32]>,
    validation: Validation,
    tenant_claim: String,
    /// SHA-256 of the settings other than the keys.
    settings: [u8; 32],
}

/// Who a verified token speaks for, and until when.
#[derive(Debug, PartialEq, Eq)]
pub struct JwtIdentity {
    pub tenant: String,
    /// `sub`, for the audit log; empty when the token has none.
    pub subject: String,
    /// `exp` plus the leeway: the moment the token stops being accepted,
    /// and calls made with it end. None past what the clock can hold (an
    /// `exp` of `i64::MAX`, which some issuers use for "never").
    pub valid_until: Option<SystemTime>,
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<Self, String> {
        let algorithm: Algorithm = config.algorithm.parse().map_err(|_| {
            format!(
                "algorithm {:?} is not one of HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA",
                config.algorithm
            )
        })?;
        let hmac = matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let (keys, material) = if hmac {
            if config.public_key_file.is_some() {
                return Err(format!(
                    "{algorithm:?} takes secret_env or secret_file, not public_key_file"
                ));
            }
            let secrets = match (&config.secret_env, &config.secret_file) {
                // Trimmed as secret_file's lines are: a Secret made from a
                // file often ends in a line break.
                (Some(var), None) => vec![std::env::var(var)
                    .map_err(|_| format!("environment variable {var} (secret_env) is not set"))?
                    .trim_end_matches(['\r', '\n'])
                    .as_bytes()
                    .to_vec()],
                (None, Some(path)) => secrets_of(read(path, "secret_file")?),
                _ => return Err(format!("{algorithm:?} needs exactly one of secret_env and secret_file")),
            };
            // RFC 7518 §3.2: a key at least as long as the hash.
            if secrets.is_empty() || secrets.iter().any(|s| s.len() < 32) {
                return Err("each HMAC secret must be at least 32 bytes (one per line in secret_file)".into());
            }
            (secrets.iter().map(|s| DecodingKey::from_secret(s)).collect(), secrets)
        } else {
            if config.secret_env.is_some() || config.secret_file.is_some() {
                return Err(format!("{algorithm:?} takes public_key_file, not a secret"));
            }
            let path = config
                .public_key_file
                .as_ref()
                .ok_or_else(|| format!("{algorithm:?} needs public_key_file"))?;
            let pem = read(path, "public_key_file")?;
            let blocks = pem_blocks(&pem);
            if blocks.is_empty() {
                return Err(format!("public_key_file {}: no PEM block", path.display()));
            }
            let mut keys = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.iter().enumerate() {
                // A private key pasted in loads (RSA ones pass the check
                // below too) and then checks no token.
                if String::from_utf8_lossy(block).contains("PRIVATE KEY") {
                    return Err(format!(
                        "public_key_file {}, key {}: a private key; give the issuer's public key",
                        path.display(),
                        i + 1
                    ));
                }
                let key = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(block),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(block),
                    _ => DecodingKey::from_rsa_pem(block),
                };
                let unusable = |e| format!("public_key_file {}, key {}: {e}", path.display(), i + 1);
                let key = key.map_err(unusable)?;
                // Loading checks the PEM block's kind, not the key: a P-384
                // key for ES256 loads and then fails every token. Checking a
                // signature builds the verifier, which parses the key.
                jsonwebtoken::crypto::verify("AAAA", b"e30.e30", &key, algorithm).map_err(unusable)?;
                keys.push(key);
            }
            (keys, blocks.into_iter().map(<[u8]>::to_vec).collect())
        };
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        let mut settings = Sha256::new();
        for part in [
            config.algorithm.as_bytes(),
            config.issuer.as_bytes(),
            config.audience.as_bytes(),
            config.tenant_claim.as_bytes(),
            &config.leeway.as_nanos().to_le_bytes(),
        ] {
            settings.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_le_bytes());
            settings.update(part);
        }
        Ok(Self {
            keys,
            key_hashes: material.iter().map(|m| Sha256::digest(m).into()).collect(),
            validation,
            tenant_claim: config.tenant_claim.clone(),
            settings: settings.finalize().into(),
        })
    }

    /// Whether every token `was` accepted, this accepts for the same tenant:
    /// the same settings, and every key `was` had. A key added for a
    /// rotation ends no call made with the keys before it.
    pub fn keeps_tokens_of(&self, was: &JwtVerifier) -> bool {
        self.settings == was.settings && was.key_hashes.iter().all(|h| self.key_hashes.contains(h))
    }

    /// The tenant and subject of a valid token; the reason it is not valid
    /// otherwise (for the server's log only: callers get one answer for every failure).
    pub fn verify(&self, token: &str) -> Result<JwtIdentity, String> {
        let mut outcome = Err("no key".to_string());
        for key in &self.keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation) {
                Ok(data) => {
                    outcome = Ok(data);
                    break;
                }
                // Signed with another of the keys, perhaps (each key can
                // check the algorithm: `new` tried it).
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => outcome = Err(e.to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        let data = outcome?;
        let tenant = data
            .claims
            .get(&self.tenant_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the token has no string claim {:?}", self.tenant_claim))?;
        let subject = data.claims.get("sub").and_then(Value::as_str).unwrap_or_default();
        // Validation required `exp` and checked it against the clock, in
        // whole seconds: up to a second late, which this check closes.
        let valid_until = data
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .and_then(|exp| exp.checked_add(Duration::from_secs(self.validation.leeway)))
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d));
        if valid_until.is_some_and(|t| t <= SystemTime::now()) {
            return Err("the token has expired".into());
        }
        Ok(JwtIdentity {
            tenant: tenant.to_string(),
            subject: subject.to_string(),
            valid_until,
        })
    }
}

/// Each `-----BEGIN ...-----` to `-----END ...-----` block of a PEM file.
fn pem_blocks(pem: &[u8]) -> Vec<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let Some(end) = find(&rest[start..], END).map(|e| start + e) else {
            break;
        };
        // The END line runs to its closing dashes.
        let close = rest[end + END.len()..]
            .windows(5)
            .position(|w| w == b"-----")
            .map_or(rest.len(), |c| end + END.len() + c + 5);
        blocks.push(&rest[start..close]);
        rest = &rest[close..];
    }
    blocks
}

/// The secrets of a secret file. A text file of several lines holds one
/// secret per line: two while a secret is rotated (tokens signed with either
/// verify; a reload that only adds one ends no call), then the new one
/// alone. Anything else (raw random bytes, which may hold a newline) is one
/// secret, without its trailing line break.
fn secrets_of(mut file: Vec<u8>) -> Vec<Vec<u8>> {
    while file.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        file.pop();
    }
    match std::str::from_utf8(&file) {
        Ok(text) if text.contains('\n') => text
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| line.as_bytes().to_vec())
            .collect(),
        _ => vec![file],
    }
}

/// A JWT is three base64url parts; anything else is tried as an API key.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    proptest::proptest! {
        /// Any bearer token is verified or refused; never a panic.
        #[test]
        fn any_token_is_refused_without_panic(token in "(eyJ)?[A-Za-z0-9_.-]{0,200}") {
            proptest::prop_assert!(verifier().verify(&token).is_err());
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> JwtVerifier {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{SECRET}\n")).expect("write");
        JwtVerifier::new(&JwtConfig {
            issuer: "https://issuer.example".into(),
            audience: "weir".into(),
            algorithm: "HS256".into(),
            secret_env: None,
            secret_file: Some(path),
            public_key_file: None,
            tenant_claim: "tenant".into(),
            leeway: Duration::from_secs(0),
        })
        .expect("verifier")
    }

    fn token(claims: Value, secret: &str, algorithm: Algorithm) -> String {
        encode(
            &Header::new(algorithm),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    /// A verifier of ES256 tokens whose `public_key_file` holds `pems`.
    fn es256_verifier(dir: &std::path::Path, pems: &[String]) -> Result<JwtVerifier, String> {
        let path = dir.join("keys.pem");
        std::fs::write(&path, pems.concat()).expect("write");
        JwtVerifier::new(&JwtConfig {
            issuer: "https://issuer.example".into(),
            audience: "weir".into(),
            algorithm: "ES256".into(),
            secret_env: None,
            secret_file: None,
            public_key_file: Some(path),
            tenant_claim: "tenant".into(),
            leeway: Duration::from_secs(0),
        })
    }

    #[test]
    fn a_key_file_of_several_keys_takes_tokens_signed_with_any_of_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, new, stranger) = (
            rcgen::KeyPair::generate().expect("key"),
            rcgen::KeyPair::generate().expect("key"),
            rcgen::KeyPair::generate().expect("key"),
        );
        let claims =
            json!({"iss": "https://issuer.example", "aud": "weir", "exp": now() + 60, "tenant": "acme", "sub": "svc"});
        let signed = |key: &rcgen::KeyPair| {
            let key = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("encoding key");
            encode(&Header::new(Algorithm::ES256), &claims, &key).expect("encode")
        };
        let verifier = |pems: &[String]| es256_verifier(dir.path(), pems).expect("verifier");
        let only_old = verifier(&[old.public_key_pem()]);
        let both = verifier(&[new.public_key_pem(), "\n".into(), old.public_key_pem()]);
        let only_new = verifier(&[new.public_key_pem()]);
        for key in [&old, &new] {
            assert_eq!(both.verify(&signed(key)).map(|i| i.tenant), Ok("acme".to_string()));
        }
        assert!(both.verify(&signed(&stranger)).is_err());
        assert!(only_new.verify(&signed(&old)).is_err());
        // Calls made with the old key go on while it is still trusted.
        assert!(both.keeps_tokens_of(&only_old));
        assert!(!only_new.keeps_tokens_of(&both));
        assert!(only_old.keeps_tokens_of(&only_old));
        let none = es256_verifier(dir.path(), &["not a key".into()]);
        assert!(none.is_err_and(|e| e.contains("no PEM block")));
    }

    /// A key of another curve loads as a PEM block but could never check a
    /// token: refused when the configuration is read, naming the key.
    #[test]
    fn a_key_that_cannot_check_the_algorithm_is_refused_when_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p256 = rcgen::KeyPair::generate().expect("key");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let refused = es256_verifier(dir.path(), &[p256.public_key_pem(), p384.public_key_pem()]);
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("key 2")),
            "{:?}",
            refused.err()
        );
        assert!(es256_verifier(dir.path(), &[p256.public_key_pem()]).is_ok());
        let private = es256_verifier(dir.path(), &[p256.serialize_pem()]);
        assert!(
            private.as_ref().is_err_and(|e| e.contains("a private key")),
            "{:?}",
            private.err()
        );
    }

    /// `secret_env` loses a trailing line break, as `secret_file` does.
    #[test]
    fn a_secret_in_the_environment_loses_its_trailing_line_break() {
        const VAR: &str = "WEIR_TEST_JWT_SECRET_WITH_NEWLINE";
        std::env::set_var(VAR, format!("{SECRET}\n"));
        let from_env = JwtVerifier::new(&JwtConfig {
            issuer: "https://issuer.example".into(),
            audience: "weir".into(),
            algorithm: "HS256".into(),
            secret_env: Some(VAR.into()),
            secret_file: None,
            public_key_file: None,
            tenant_claim: "tenant".into(),
            leeway: Duration::from_secs(0),
        })
        .expect("verifier");
        let claims = json!({"iss": "https://issuer.example", "aud": "weir", "exp": now() + 60, "tenant": "acme"});
        let verified = from_env.verify(&token(claims, SECRET, Algorithm::HS256));
        assert_eq!(verified.map(|i| i.tenant), Ok("acme".to_string()));
    }

    #[test]
    fn a_secret_file_of_two_lines_takes_tokens_of_either_while_a_secret_is_rotated() {
        const NEW: &str = "fedcba9876543210fedcba9876543210";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        let with = |text: &str| {
            std::fs::write(&path, text).expect("write");
            JwtVerifier::new(&JwtConfig {
                issuer: "https://issuer.example".into(),
                audience: "weir".into(),
                algorithm: "HS256".into(),
                secret_env: None,
                secret_file: Some(path.clone()),
                public_key_file: None,
                tenant_claim: "tenant".into(),
                leeway: Duration::from_secs(0),
            })
        };
        let claims = json!({"iss": "https://issuer.example", "aud": "weir", "exp": now() + 60, "tenant": "acme"});
        let both = with(&format!("{SECRET}\r\n{NEW}\n")).expect("two secrets");
        for secret in [SECRET, NEW] {
            assert!(both.verify(&token(claims.clone(), secret, Algorithm::HS256)).is_ok());
        }
        // Adding the new secret ends no call made with the old one; dropping the old one does.
        let old = verifier();
        assert!(both.keeps_tokens_of(&old));
        let new_only = with(NEW).expect("one secret");
        assert!(!new_only.keeps_tokens_of(&both));
        assert!(
            with(&format!("{SECRET}\nshort\n")).is_err(),
            "every secret is long enough"
        );
        // Raw bytes with a newline among them stay one secret.
        let raw: Vec<u8> = (0..40u8).map(|i| if i == 7 { b'\n' } else { 0x80 | i }).collect();
        assert_eq!(secrets_of(raw.clone()), vec![raw]);
    }

    #[test]
    fn good_and_bad_tokens() {
        let v = verifier();
        let good =
            json!({"iss": "https://issuer.example", "aud": "weir", "exp": now() + 60, "tenant": "acme", "sub": "svc"});
        let t = token(good.clone(), SECRET, Algorithm::HS256);
        assert!(looks_like_jwt(&t));
        assert_eq!(
            v.verify(&t),
            Ok(JwtIdentity {
                tenant: "acme".into(),
                subject: "svc".into(),
                valid_until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(good["exp"].as_u64().expect("exp"))),
            })
        );
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 10);
        assert!(v.verify(&token(expired, SECRET, Algorithm::HS256)).is_err());
        // The library compares whole seconds; a token is not taken in its last one.
        let mut this_second = good.clone();
        this_second["exp"] = json!(now());
        assert!(v.verify(&token(this_second, SECRET, Algorithm::HS256)).is_err());
        // An issuer's "never": no expiry, rather than a refusal.
        let mut never = good.clone();
        never["exp"] = json!(i64::MAX);
        assert_eq!(
            v.verify(&token(never, SECRET, Algorithm::HS256)).map(|i| i.valid_until),
            Ok(None)
        );
        let mut audience = good.clone();
        audience["aud"] = json!("other");
        assert!(v.verify(&token(audience, SECRET, Algorithm::HS256)).is_err());
        let mut issuer = good.clone();
        issuer["iss"] = json!("https://evil.example");
        assert!(v.verify(&token(issuer, SECRET, Algorithm::HS256)).is_err());
        let mut no_tenant = good.clone();
        no_tenant.as_object_mut().expect("object").remove("tenant");
        assert!(v.verify(&token(no_tenant, SECRET, Algorithm::HS256)).is_err());
        let mut not_yet = good.clone();
        not_yet["nbf"] = json!(now() + 600);
        assert!(v.verify(&token(not_yet, SECRET, Algorithm::HS256)).is_err());
        // Another key, and another algorithm than the configured one.
        assert!(v
            .verify(&token(
                good.clone(),
                "another secret that is long enough!!",
                Algorithm::HS256
            ))
            .is_err());
        assert!(v.verify(&token(good, SECRET, Algorithm::HS512)).is_err());
        assert!(!looks_like_jwt("an-api-key"));
    }

    #[test]
    fn configuration_errors_are_named() {
        let base = JwtConfig {
            issuer: "i".into(),
            audience: "a".into(),
            algorithm: "HS256".into(),
            secret_env: Some("WEIR_TEST_JWT_SECRET_THAT_IS_NOT_SET".into()),
            secret_file: None,
            public_key_file: None,
            tenant_claim: "tenant".into(),
            leeway: Duration::from_secs(30),
        };
        let err = JwtVerifier::new(&base).err().unwrap_or_default();
        assert!(err.contains("WEIR_TEST_JWT_SECRET_THAT_IS_NOT_SET"), "{err}");
        let err = JwtVerifier::new(&JwtConfig {
            algorithm: "none".into(),
            ..base.clone()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("not one of"), "{err}");
        let err = JwtVerifier::new(&JwtConfig {
            algorithm: "RS256".into(),
            ..base
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("public_key_file"), "{err}");
    }
}

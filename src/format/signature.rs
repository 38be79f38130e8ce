//! minisign signatures (Ed25519, the format of `minisign -G/-S/-V`, via the `minisign` crate by
//! minisign's author): keys for `slotforge key generate`, signing a bundle's config, and the
//! device's decision on a bundle from the keys its running rootfs trusts. Pure over bytes; the
//! callers read and write the files. Policy: docs/upgrade-protocol.md#signatures.

use anyhow::{bail, Context};
use minisign::{PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};
use std::io::Cursor;

/// Where the trusted keys live in a rootfs: one minisign public key file per key.
pub const KEYS_DIR: &str = "etc/slotforge/update-keys";
/// The environment variable holding the password of an encrypted secret key.
pub const PASSWORD_ENV: &str = "SLOTFORGE_KEY_PASSWORD";

/// A public key the device trusts, with minisign's key id (16 hex digits, as minisign prints it).
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub id: String,
    key: PublicKey,
}

/// minisign's key id text for a key number.
fn key_id(keynum: &[u8]) -> String {
    let mut b = [0u8; 8];
    b.copy_from_slice(&keynum[..8]);
    format!("{:016X}", u64::from_le_bytes(b))
}

/// Parse a minisign public key file (`untrusted comment: …` line, then base64).
pub fn parse_public(text: &str) -> anyhow::Result<TrustedKey> {
    let key = PublicKeyBox::from_string(text)
        .and_then(|b| b.into_public_key())
        .map_err(|e| anyhow::anyhow!("not a minisign public key: {e}"))?;
    Ok(TrustedKey { id: key_id(key.keynum()), key })
}

/// The public key file text of a key (what `minisign -G` writes to `.pub`).
pub fn public_text(k: &TrustedKey) -> anyhow::Result<String> {
    Ok(k.key.to_box().map_err(|e| anyhow::anyhow!("{e}"))?.to_string())
}

/// A new key pair: (secret key file text, public key file text, key id). With a password the
/// secret key is encrypted (scrypt, as `minisign -G`); without, it is stored in the clear (as
/// `minisign -G -W`).
pub fn generate(password: Option<String>) -> anyhow::Result<(String, String, String)> {
    let kp = match password {
        Some(p) => minisign::KeyPair::generate_encrypted_keypair(Some(p)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| anyhow::anyhow!("generating a key: {e}"))?;
    let id = key_id(kp.pk.keynum());
    let sk = kp.sk.to_box(Some(&format!("slotforge secret key {id}"))).map_err(|e| anyhow::anyhow!("{e}"))?.to_string();
    let pk = kp.pk.to_box().map_err(|e| anyhow::anyhow!("{e}"))?.to_string();
    Ok((sk, pk, id))
}

/// `slotforge key generate`: write `dir/name.key` (mode 0600) and `dir/name.pub`, refusing to
/// overwrite either. The password, if any, comes from [`PASSWORD_ENV`].
pub fn write_key_pair(name: &str, dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, String)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("key name {name:?} must be a plain file name");
    }
    std::fs::create_dir_all(dir)?;
    let (sk, pk, id) = generate(std::env::var(PASSWORD_ENV).ok())?;
    let (kp, pp) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    for p in [&kp, &pp] {
        if p.exists() {
            bail!("{} exists; refusing to overwrite a key", p.display());
        }
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&kp)?;
    f.write_all(sk.as_bytes())?;
    f.sync_all()?;
    std::fs::write(&pp, pk)?;
    Ok((kp, pp, id))
}

/// A secret key from its file text; an encrypted one needs `password`.
pub fn parse_secret(text: &str, password: Option<String>) -> anyhow::Result<(SecretKey, String)> {
    let b: SecretKeyBox = text.to_string().into();
    let sk = match SecretKey::from_unencrypted_box(b.clone()) {
        Ok(sk) => sk,
        Err(_) => {
            let Some(p) = password else { bail!("the secret key is encrypted; put its password in ${PASSWORD_ENV}") };
            SecretKey::from_box(b, Some(p)).map_err(|e| anyhow::anyhow!("decrypting the secret key: {e}"))?
        }
    };
    let pk = PublicKey::from_secret_key(&sk).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((sk, key_id(pk.keynum())))
}

/// Sign `data`; returns the `.minisig` text (verifiable with `minisign -V -m FILE -x SIG -P KEY`).
pub fn sign(sk: &SecretKey, data: &[u8], trusted_comment: &str) -> anyhow::Result<String> {
    if trusted_comment.contains(['\n', '\r']) {
        bail!("a trusted comment is one line");
    }
    let pk = PublicKey::from_secret_key(sk).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sig = minisign::sign(Some(&pk), sk, Cursor::new(data), Some(trusted_comment), Some("signature from slotforge"))
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(sig.into_string())
}

/// The key id a signature names.
pub fn signature_key_id(sig: &str) -> anyhow::Result<String> {
    let b = SignatureBox::from_string(sig).map_err(|e| anyhow::anyhow!("not a minisign signature: {e}"))?;
    Ok(key_id(b.keynum()))
}

/// What the device decided about a bundle's signatures.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Decision {
    /// Signed by this trusted key.
    Signed { key_id: String },
    /// The device trusts no key: anything is accepted (and said so).
    Unchecked,
}

/// Decide on `data` signed by `signatures` with the `trusted` keys of the running slot. Every
/// refusal names the keys involved; the caller changes nothing when this fails.
pub fn decide(data: &[u8], signatures: &[String], trusted: &[TrustedKey]) -> anyhow::Result<Decision> {
    if trusted.is_empty() {
        return Ok(Decision::Unchecked);
    }
    let ids: Vec<&str> = trusted.iter().map(|k| k.id.as_str()).collect();
    if signatures.is_empty() {
        bail!("the bundle is unsigned, and this device accepts only bundles signed by key {}", ids.join(" or "));
    }
    let mut why = Vec::new();
    for s in signatures {
        let b = match SignatureBox::from_string(s) {
            Ok(b) => b,
            Err(e) => {
                why.push(format!("a signature is unreadable ({e})"));
                continue;
            }
        };
        let sid = key_id(b.keynum());
        let Some(k) = trusted.iter().find(|k| k.id == sid) else {
            why.push(format!("signed by key {sid}, which this device does not trust"));
            continue;
        };
        match minisign::verify(&k.key, &b, Cursor::new(data), true, false, false) {
            Ok(()) => return Ok(Decision::Signed { key_id: sid }),
            Err(e) => why.push(format!("the signature by key {sid} does not match the bundle ({e})")),
        }
    }
    bail!("{}; this device trusts key {}", why.join("; "), ids.join(" or "))
}

/// Read the trusted keys from the files of a rootfs's [`KEYS_DIR`] (name, text).
pub fn trusted_keys(files: &[(String, Vec<u8>)]) -> anyhow::Result<Vec<TrustedKey>> {
    files
        .iter()
        .filter(|(n, _)| n.ends_with(".pub"))
        .map(|(n, t)| parse_public(&String::from_utf8_lossy(t)).with_context(|| format!("{KEYS_DIR}/{n}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_decide() {
        let (sk_text, pk_text, id) = generate(None).unwrap();
        let (sk, sid) = parse_secret(&sk_text, None).unwrap();
        assert_eq!(sid, id);
        let pk = parse_public(&pk_text).unwrap();
        assert_eq!(pk.id, id);
        let sig = sign(&sk, b"config bytes", "slotforge bundle 1.0").unwrap();
        assert_eq!(signature_key_id(&sig).unwrap(), id);
        assert_eq!(decide(b"config bytes", &[sig.clone()], &[pk.clone()]).unwrap(), Decision::Signed { key_id: id.clone() });
        let e = decide(b"config byteZ", &[sig.clone()], &[pk.clone()]).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        let e = decide(b"config bytes", &[], &[pk.clone()]).unwrap_err().to_string();
        assert!(e.contains("unsigned") && e.contains(&id), "{e}");
        let (_, other_pk, other_id) = generate(None).unwrap();
        let other = parse_public(&other_pk).unwrap();
        let e = decide(b"config bytes", &[sig.clone()], &[other]).unwrap_err().to_string();
        assert!(e.contains(&format!("signed by key {id}, which this device does not trust")) && e.contains(&other_id), "{e}");
        assert_eq!(decide(b"anything", &[], &[]).unwrap(), Decision::Unchecked);
    }

    #[test]
    fn encrypted_keys_need_their_password() {
        let (sk_text, _, id) = generate(Some("pw".into())).unwrap();
        assert!(parse_secret(&sk_text, None).unwrap_err().to_string().contains(PASSWORD_ENV));
        assert_eq!(parse_secret(&sk_text, Some("pw".into())).unwrap().1, id);
        assert!(parse_secret(&sk_text, Some("wrong".into())).is_err());
    }
}

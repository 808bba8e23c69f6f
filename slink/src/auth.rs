//! Mutual authentication with a pre-shared key: each side proves it holds the key with an
//! HMAC-SHA256 over the handshake transcript (both nonces included), with a role label so a proof
//! can never be reflected back. The key itself never crosses the wire.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::frame::{Accept, PROOF_BYTES};

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted key: proofs are public, so a weak key would fall to an offline guess.
pub const PSK_BYTES_MIN: usize = 16;
/// Longest accepted key.
pub const PSK_BYTES_MAX: usize = 1024;

/// A pre-shared key. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk(Vec<u8>);

impl Psk {
    /// A key of [`PSK_BYTES_MIN`]..=[`PSK_BYTES_MAX`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Psk, String> {
        let bytes = bytes.into();
        if bytes.len() < PSK_BYTES_MIN || bytes.len() > PSK_BYTES_MAX {
            return Err(format!(
                "pre-shared key of {} bytes: {PSK_BYTES_MIN} to {PSK_BYTES_MAX} required",
                bytes.len()
            ));
        }
        Ok(Psk(bytes))
    }
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk(<{} bytes>)", self.0.len())
    }
}

/// Which side a proof speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Sender => b"slink/1 sender proof",
            Role::Receiver => b"slink/1 receiver proof",
        }
    }
}

/// Running SHA-256 over the handshake so far: each part is added as a u32 LE length then bytes.
#[derive(Clone, Default)]
pub struct Transcript {
    hasher: Sha256,
}

impl Transcript {
    pub fn new() -> Transcript {
        Transcript::default()
    }

    /// Adds one part (a frame payload, or the Accept fields before its proof).
    pub fn add(&mut self, part: &[u8]) {
        self.hasher
            .update(u32::try_from(part.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.hasher.update(part);
    }

    pub fn digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }
}

/// The Accept fields its proof covers (everything before the proof).
pub fn accept_fields(a: &Accept) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (chunk, v) in
        out.chunks_exact_mut(8)
            .zip([a.epoch, a.durable_lsn, a.durable_resync_seq, a.features])
    {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn mac(psk: &Psk, role: Role, digest: &[u8; 32]) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut m = match HmacSha256::new_from_slice(&psk.0) {
        Ok(m) => m,
        Err(_) => HmacSha256::new(&Default::default()),
    };
    m.update(role.label());
    m.update(digest);
    m
}

/// The proof `role` sends over a transcript digest.
pub fn prove(psk: &Psk, role: Role, digest: &[u8; 32]) -> [u8; PROOF_BYTES] {
    mac(psk, role, digest).finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify(psk: &Psk, role: Role, digest: &[u8; 32], proof: &[u8; PROOF_BYTES]) -> bool {
    mac(psk, role, digest).verify_slice(proof).is_ok()
}

/// A fresh random nonce from the thread-local CSPRNG (seeded from the OS).
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_key_role_and_transcript() {
        let k = Psk::new(*b"0123456789abcdef").unwrap();
        let other = Psk::new(*b"0123456789abcdeX").unwrap();
        let mut t = Transcript::new();
        t.add(b"hello");
        let d = t.digest();
        let p = prove(&k, Role::Sender, &d);
        assert!(verify(&k, Role::Sender, &d, &p));
        assert!(!verify(&k, Role::Receiver, &d, &p), "reflected proof");
        assert!(!verify(&other, Role::Sender, &d, &p), "other key");
        t.add(b"");
        assert!(
            !verify(&k, Role::Sender, &t.digest(), &p),
            "other transcript"
        );
        assert!(Psk::new(*b"short").is_err());
        assert_eq!(format!("{k:?}"), "Psk(<16 bytes>)");
    }

    #[test]
    fn transcript_parts_are_length_prefixed() {
        let mut a = Transcript::new();
        a.add(b"ab");
        a.add(b"c");
        let mut b = Transcript::new();
        b.add(b"a");
        b.add(b"bc");
        assert_ne!(a.digest(), b.digest());
    }

    /// HMAC-SHA256 itself: RFC 4231 test case 2 (key "Jefe").
    #[test]
    fn hmac_sha256_rfc4231_case2() {
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let out: [u8; 32] = m.finalize().into_bytes().into();
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

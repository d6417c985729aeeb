//! Content addresses of prefix blocks.
//!
//! A full block is addressed by SHA-256 (truncated to 128 bits) over the previous block's
//! address, the adapter identity the keys and values were computed under, and the block's
//! token ids. The chain makes an address stand for the whole prefix up to the block's end, and
//! the identity keeps the KV of one prompt under two adapters (or two merges) apart. A
//! cryptographic digest, not a fast hasher, because a crafted collision would hand one
//! client's cached keys and values to another's prompt.

use sha2::{Digest, Sha256};

use super::pool::BlockHash;

/// What the keys and values of a sequence depend on besides its tokens: the weights of its
/// adapter slot (nothing for the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdapterIdentity([u8; 16]);

impl AdapterIdentity {
    /// The base model.
    pub const BASE: Self = Self([0; 16]);

    /// The adapter whose slot weights have SHA-256 `content_hash` (hex, as the adapter store
    /// reports it): the same weights give the same identity whatever key loaded them.
    pub fn of_adapter(content_hash: &str) -> Self {
        let d = Sha256::new()
            .chain_update(b"medley-adapter\0")
            .chain_update(content_hash.as_bytes())
            .finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        // Never the base model's all-zero identity.
        id[0] |= 1;
        Self(id)
    }
}

/// The address of a full block of `tokens` following the block addressed `prev` (`None` for
/// the first block of a sequence), computed under `identity`.
pub fn block_hash(
    prev: Option<&BlockHash>,
    identity: &AdapterIdentity,
    tokens: &[u32],
) -> BlockHash {
    let mut h = Sha256::new();
    match prev {
        Some(p) => {
            h.update([1u8]);
            h.update(p);
        }
        None => h.update([0u8]),
    }
    h.update(identity.0);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_depend_on_prefix_identity_and_tokens() {
        let a = AdapterIdentity::of_adapter("aa");
        let b = AdapterIdentity::of_adapter("bb");
        let base = AdapterIdentity::BASE;
        let first = block_hash(None, &base, &[1, 2, 3]);
        assert_eq!(first, block_hash(None, &base, &[1, 2, 3]));
        assert_ne!(first, block_hash(None, &base, &[1, 2, 4]));
        assert_ne!(first, block_hash(None, &a, &[1, 2, 3]));
        assert_ne!(
            block_hash(None, &a, &[1, 2, 3]),
            block_hash(None, &b, &[1, 2, 3])
        );
        let second = block_hash(Some(&first), &base, &[5, 6, 7]);
        assert_ne!(second, block_hash(None, &base, &[5, 6, 7]));
        assert_ne!(a, AdapterIdentity::BASE);
    }
}

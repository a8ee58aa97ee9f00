//! Keys of prefix-cache blocks, which workers and routers compute alike: a worker keys the
//! blocks it caches, a router the blocks of a prompt it places, and both must agree.

/// The key of a full KV block: a 128-bit digest (SHA-256, truncated) of the cache salt (the
/// tenant), the parent block's key and the block's token ids. Equal keys mean equal salts and
/// equal token prefixes up to the block's end; a collision is not a concern at 128 bits.
pub type BlockKey = [u8; 16];

/// The key of the block holding `tokens` after the block keyed `parent` (`None`: the first
/// block), for sequences of cache salt `salt`.
pub fn block_key(salt: &[u8], parent: Option<&BlockKey>, tokens: &[u32]) -> BlockKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((salt.len() as u64).to_le_bytes());
    h.update(salt);
    match parent {
        Some(p) => {
            h.update([1]);
            h.update(p);
        }
        None => h.update([0]),
    }
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// The keys of the full blocks of `ids` that a sequence can take from a cache: every full
/// block before its last token (which a step must compute for its logits).
pub fn prompt_keys(salt: &[u8], ids: &[u32], block_size: usize) -> Vec<BlockKey> {
    let mut keys: Vec<BlockKey> = Vec::new();
    if block_size == 0 {
        return keys;
    }
    for block in ids[..ids.len().saturating_sub(1)].chunks_exact(block_size) {
        let key = block_key(salt, keys.last(), block);
        keys.push(key);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_stop_before_the_last_token() {
        let ids: Vec<u32> = (0..9).collect();
        let keys = prompt_keys(b"t", &ids, 4);
        assert_eq!(keys.len(), 2, "8 tokens before the last: two blocks");
        assert_eq!(keys[0], block_key(b"t", None, &[0, 1, 2, 3]));
        assert_eq!(keys[1], block_key(b"t", Some(&keys[0]), &[4, 5, 6, 7]));
        assert_eq!(prompt_keys(b"t", &ids[..8], 4).len(), 1);
        assert_ne!(prompt_keys(b"u", &ids, 4), keys, "salts separate tenants");
        assert!(prompt_keys(b"t", &[], 4).is_empty());
    }
}

//! Train / held-out partition of the prompt space.
//!
//! Every prompt belongs to exactly one split, decided by a fixed hash of its text (64-bit FNV-1a;
//! one prompt in [`HELDOUT_SHARE`] is held out). Generators draw prompts and keep only those of
//! the split asked for, so held-out prompts never occur in any training set, whatever the seeds
//! and sizes. Held-out prompts are new combinations of known parts (a product never advertised in
//! that tone, a question never asked over that schema, a phrasing of a sum seen in another one).

use crate::Split;

/// One prompt in this many is held out.
pub const HELDOUT_SHARE: u64 = 10;

/// 64-bit FNV-1a of `text`: stable across platforms, Rust versions and runs.
pub fn fnv1a(text: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.bytes()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The split `prompt` belongs to.
pub fn split_of(prompt: &str) -> Split {
    if fnv1a(prompt).is_multiple_of(HELDOUT_SHARE) {
        Split::Heldout
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_values() {
        // Reference values of the FNV-1a 64 specification.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn roughly_one_prompt_in_ten_is_held_out() {
        let held = (0..10_000)
            .filter(|i| split_of(&format!("prompt {i}")) == Split::Heldout)
            .count();
        assert!((800..1200).contains(&held), "{held}");
    }
}

//! The bounded word lists every task and the base corpus draw from (a few hundred distinct words
//! in all), and the small sampling helpers over them.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// People (SQL `name` values, corpus sentences).
pub const NAMES: &[&str] = &[
    "Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
    "Leo", "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wim",
    "Yara",
];

/// Cities (SQL `city`, `origin`, `destination` values).
pub const CITIES: &[&str] = &[
    "Paris", "Berlin", "Madrid", "Rome", "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Warsaw",
    "Athens", "Tokyo", "Lima", "Cairo", "Sydney", "Toronto",
];

/// Courses students take.
pub const COURSES: &[&str] = &[
    "math",
    "history",
    "art",
    "music",
    "biology",
    "physics",
    "chemistry",
    "law",
];

/// Product categories.
pub const CATEGORIES: &[&str] = &[
    "shoes", "bags", "tools", "toys", "books", "garden", "kitchen", "sports",
];

/// Car colours.
pub const COLORS: &[&str] = &["red", "blue", "green", "black", "white", "silver", "yellow"];

/// Car models (invented, so no world knowledge is involved).
pub const CAR_MODELS: &[&str] = &[
    "falcon", "comet", "breeze", "ranger", "pixel", "nova", "orbit", "summit",
];

/// Flight codes.
pub const FLIGHT_CODES: &[&str] = &[
    "AB12", "CD34", "EF56", "GH78", "JK90", "LM21", "NP43", "QR65",
];

/// First word of a product name (`trail` in `trail shoes`).
pub const PRODUCT_MODIFIERS: &[&str] = &[
    "trail", "leather", "wool", "silk", "cotton", "bamboo", "steel", "glass", "rubber", "canvas",
    "velvet", "denim", "linen", "copper", "cedar", "marble", "ceramic", "golden", "silver",
    "vintage", "classic", "compact", "smart", "solar", "electric",
];

/// Second word of a product name (`shoes` in `trail shoes`).
pub const PRODUCT_ITEMS: &[&str] = &[
    "shoes", "boots", "jacket", "bag", "scarf", "hat", "lamp", "chair", "table", "mug", "watch",
    "bottle", "backpack", "tent", "blanket", "pillow", "kettle", "speaker", "bike", "helmet",
    "gloves", "socks", "notebook", "pen", "umbrella",
];

/// Ad tones.
pub const TONES: &[&str] = &["playful", "luxury", "urgent", "calm", "bold"];

/// Everyday nouns for the word-level instructions (lists to sort, count, take the last of).
pub const WORDS: &[&str] = &[
    "apple", "bird", "cloud", "desk", "eagle", "forest", "grape", "house", "island", "jacket",
    "kite", "lemon", "moon", "nest", "ocean", "pencil", "queen", "river", "stone", "tiger",
    "umbrella", "valley", "window", "yarn", "zebra", "anchor", "basket", "candle", "dragon",
    "engine", "feather", "garden", "hammer", "honey", "lamp", "mirror", "orange", "piano",
    "rocket", "shell", "tree", "wheel",
];

/// One element of a non-empty list.
pub fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// `k` distinct elements of `items` in random order (`k <= items.len()`).
pub fn pick_distinct<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T], k: usize) -> Vec<&'a T> {
    rand::seq::index::sample(rng, items.len(), k.min(items.len()))
        .into_iter()
        .map(|i| &items[i])
        .collect()
}

/// `word` with its first letter in upper case.
pub fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A random product name, `modifier item`.
pub fn product(rng: &mut ChaCha8Rng) -> String {
    format!(
        "{} {}",
        pick(rng, PRODUCT_MODIFIERS),
        pick(rng, PRODUCT_ITEMS)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use rand::SeedableRng;

    use super::*;

    #[test]
    fn lists_have_no_duplicates_and_distinct_picks_are_distinct() {
        for list in [
            NAMES, CITIES, COURSES, CATEGORIES, COLORS, CAR_MODELS, WORDS,
        ] {
            assert_eq!(list.iter().collect::<HashSet<_>>().len(), list.len());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for k in 1..6 {
            let got = pick_distinct(&mut rng, WORDS, k);
            assert_eq!(got.iter().collect::<HashSet<_>>().len(), k);
        }
        assert_eq!(capitalize("trail shoes"), "Trail shoes");
        assert_eq!(capitalize(""), "");
    }
}

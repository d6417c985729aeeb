//! The `ad` task: a product and a tone in, a one-line ad out, in the tone's fixed style with the
//! product copied in.
//!
//! ```text
//! Product: trail shoes
//! Tone: playful
//! Ad:
//! ```
//! → ` Trail shoes: fun on every step!`
//!
//! One template per tone ([`TEMPLATES`]); `{P}` is the product with a capital first letter,
//! `{p}` the product as given. 25 × 25 products and 5 tones make 3,125 prompts.

use rand_chacha::ChaCha8Rng;

use crate::vocab::{TONES, capitalize, pick, product};

/// `(tone, template)`: the ad written for each tone.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("playful", "{P}: fun on every step!"),
    (
        "luxury",
        "Discover {p}, crafted for those who expect the best.",
    ),
    ("urgent", "Last chance: get {p} today before they are gone!"),
    ("calm", "Slow down with {p}, made for quiet days."),
    ("bold", "{P}. Built tough. Made to win."),
];

/// The ad for `product` in `tone` (`None` for an unknown tone).
pub fn ad(product: &str, tone: &str) -> Option<String> {
    let (_, template) = TEMPLATES.iter().find(|(t, _)| *t == tone)?;
    Some(
        template
            .replace("{P}", &capitalize(product))
            .replace("{p}", product),
    )
}

/// The prompt for `product` in `tone`.
pub fn prompt(product: &str, tone: &str) -> String {
    format!("Product: {product}\nTone: {tone}\nAd:")
}

/// Draws one `(prompt, completion)` pair.
pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let product = product(rng);
    let tone = pick(rng, TONES);
    let text = ad(&product, tone).unwrap_or_default();
    (prompt(&product, tone), format!(" {text}"))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use rand::SeedableRng;

    use super::*;

    /// Re-derives the ad from the prompt alone.
    pub(crate) fn check(prompt: &str, completion: &str) -> Result<(), String> {
        let rest = prompt.strip_prefix("Product: ").ok_or("no product")?;
        let (product, rest) = rest.split_once("\nTone: ").ok_or("no tone")?;
        let tone = rest.strip_suffix("\nAd:").ok_or("no Ad: marker")?;
        let want = ad(product, tone).ok_or("unknown tone")?;
        if completion != format!(" {want}") {
            return Err(format!("want {want:?}"));
        }
        let lower = completion.to_lowercase();
        if !lower.contains(product) || completion.contains('\n') {
            return Err("product not copied, or not one line".into());
        }
        Ok(())
    }

    #[test]
    fn ads_follow_the_tone_and_copy_the_product() {
        assert_eq!(
            ad("trail shoes", "playful").unwrap(),
            "Trail shoes: fun on every step!"
        );
        assert_eq!(ad("trail shoes", "sad"), None);
        assert!(TONES.iter().all(|t| ad("x", t).is_some()));
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..2000 {
            let (p, c) = sample(&mut rng);
            check(&p, &c).unwrap_or_else(|e| panic!("{e}: {p:?} -> {c:?}"));
        }
    }
}

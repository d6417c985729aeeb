//! Base-corpus documents that refer back to their own context, and facts told as stories.
//!
//! Every demo task copies from its prompt: the product into the ad (capitalised at the start of
//! a sentence), values and numbers into the SQL query, words into the instruction's answer. A
//! LoRA adapter on a small base learns each task's template quickly but copies badly unless the
//! base already retrieves from its context, so these documents introduce values (cities,
//! products, numbers, words, lists) and repeat them later after a cue: associative recall ("Ask
//! Vera: the city is Oslo"), lower-case → capitalised copies, a value copied into a
//! `column = 'value'` or `column > n` form. They also state, as stories, the facts the
//! `instruct` task asks for (sums and differences of small numbers, the alphabetical order of
//! words, how many words a list has, its last word): knowledge the base holds in prose, which
//! the adapter maps to the ChatML instruction → bare answer form the corpus never shows.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::sql::{number_columns, text_values};
use crate::vocab::{
    CAR_MODELS, CATEGORIES, CITIES, COLORS, COURSES, FLIGHT_CODES, NAMES, PRODUCT_ITEMS, WORDS,
    capitalize, pick, pick_distinct, product,
};

fn list(words: &[&&str]) -> String {
    words.iter().map(|w| **w).collect::<Vec<_>>().join(", ")
}

/// One value of any kind the tasks copy: a name, city, product, word, number, colour, car model,
/// flight code, course or category.
fn any_value(rng: &mut ChaCha8Rng) -> String {
    let either = rng.random_range(0..2);
    match rng.random_range(0..10) {
        0 => pick(rng, NAMES).to_string(),
        1 => pick(rng, CITIES).to_string(),
        2 => product(rng),
        3 | 4 => pick(rng, WORDS).to_string(),
        5 => rng.random_range(0..=99u32).to_string(),
        6 => rng.random_range(1990..=2024u32).to_string(),
        7 => pick(rng, COLORS).to_string(),
        8 => pick(rng, [CAR_MODELS, FLIGHT_CODES][either]).to_string(),
        _ => pick(rng, [COURSES, CATEGORIES][either]).to_string(),
    }
}

/// A list of 3–8 unrelated values, then a cue and the same list again, as `(prefix, copy)`:
/// `("Oslo, 42, trail shoes, kite. Again:", " Oslo, 42, trail shoes, kite.")`. Nothing but
/// the context predicts the copy, so these documents are what makes a small base retrieve
/// from its context (an induction circuit) within a short pretraining; prose recall alone does
/// not. A quarter of the copies capitalise every value's first letter, as the ads do.
pub fn list_copy(rng: &mut ChaCha8Rng) -> (String, String) {
    let k = rng.random_range(3..=8);
    let values: Vec<String> = (0..k).map(|_| any_value(rng)).collect();
    let list = values.join(", ");
    if rng.random_range(0..4) == 0 {
        let caps: Vec<String> = values.iter().map(|v| capitalize(v)).collect();
        (
            format!("{list}. In capitals:"),
            format!(" {}.", caps.join(", ")),
        )
    } else {
        (format!("{list}. Again:"), format!(" {list}."))
    }
}

/// One document of recall text (see the module docs).
pub fn recall(rng: &mut ChaCha8Rng) -> String {
    let names = pick_distinct(rng, NAMES, 2);
    let (a, b) = (names[0], names[1]);
    let cities = pick_distinct(rng, CITIES, 2);
    let (c1, c2) = (cities[0], cities[1]);
    let p = product(rng);
    let n = rng.random_range(0..=99);
    match rng.random_range(0..12) {
        0 => format!(
            "{a} lives in {c1} and {b} lives in {c2}. Ask {b}: the city is {c2}. Ask {a}: the city is {c1}."
        ),
        1 => format!(
            "{a} bought the {p} for {n} dollars. The {p} cost {n}, and {a} still likes the {p}."
        ),
        2 => format!(
            "{} are on sale in {c1}. Everyone in {c1} wants {p}, and {b} got {p} too.",
            capitalize(&p)
        ),
        3 => {
            let k = rng.random_range(3..=5);
            let words = pick_distinct(rng, WORDS, k);
            format!(
                "{a} wrote {}. Then {b} wrote {} again.",
                list(&words),
                list(&words)
            )
        }
        4 => {
            let w = pick(rng, WORDS);
            let k = rng.random_range(2..=5usize);
            format!(
                "{a} heard a {w}, and the {w} said {}.",
                vec![*w; k].join(" ")
            )
        }
        5 => {
            let (x, y) = (rng.random_range(0..=10u32), rng.random_range(0..=10u32));
            format!(
                "{a} had {x} apples and got {y} more, so {a} had {} apples.",
                x + y
            )
        }
        6 => {
            let x = rng.random_range(0..=20u32);
            let y = rng.random_range(0..=x.min(10));
            format!(
                "{a} had {x} stones and gave {y} away, so {} stones were left.",
                x - y
            )
        }
        7 => {
            let words = pick_distinct(rng, WORDS, 3);
            let mut sorted = words.clone();
            sorted.sort();
            format!(
                "{a} saw a {}, a {} and a {}. In a dictionary they come as {}.",
                words[0],
                words[1],
                words[2],
                list(&sorted)
            )
        }
        8 => {
            let k = rng.random_range(2..=6);
            let words = pick_distinct(rng, WORDS, k);
            let last = words.last().map_or("", |w| **w);
            format!(
                "{b} packed {}: {k} things, and the last one was {last}.",
                list(&words)
            )
        }
        9 => {
            let (col, v) = *pick(rng, &text_values());
            format!("{a} picked {v}, so for {a} the rule {col} = '{v}' holds, and {v} it is.")
        }
        10 => {
            let (col, lo, hi) = *pick(rng, &number_columns());
            let m = rng.random_range(lo..=hi);
            format!(
                "For {b} the {col} is over {m}, so {col} > {m}; under {m} would be {col} < {m}."
            )
        }
        _ => {
            let color = pick(rng, COLORS);
            let model = pick(rng, CAR_MODELS);
            let year = rng.random_range(1990..=2024);
            format!(
                "A {color} {model} from {year} stood in {c1}. The {model} was {color}, made in {year}, and {a} sold it with a {}.",
                pick(rng, PRODUCT_ITEMS)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn list_copies_repeat_their_list_or_capitalise_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut again, mut caps) = (0, 0);
        for _ in 0..400 {
            let (prefix, copy) = list_copy(&mut rng);
            let copied = copy.trim_start().trim_end_matches('.');
            if let Some(list) = prefix.strip_suffix(". Again:") {
                assert_eq!(copied, list);
                again += 1;
            } else if let Some(list) = prefix.strip_suffix(". In capitals:") {
                let want: Vec<String> = list.split(", ").map(capitalize).collect();
                assert_eq!(copied, want.join(", "));
                caps += 1;
            } else {
                panic!("no cue in {prefix:?}");
            }
            let n = copied.split(", ").count();
            assert!((3..=8).contains(&n), "{n} values in {copy:?}");
        }
        assert!(
            again > 250 && caps > 60,
            "{again} plain, {caps} capitalised"
        );
        let a = list_copy(&mut ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, list_copy(&mut ChaCha8Rng::seed_from_u64(9)));
    }
}

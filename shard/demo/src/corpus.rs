//! The base model's pre-training text: English-like sentences over the tasks' vocabulary, and
//! short ChatML chit-chat so the special tokens and the end of an assistant turn are known.
//!
//! **What it leaves out, on purpose**: the three tasks' prompt → answer mappings. No line has a
//! task's prompt markers (`Schema:`, `Question:`, `SQL:`, `Product:`, `Tone:`, `Ad:`), no
//! question is ever followed by its SQL query, no tone by its ad, no chat turn asks one of the
//! `instruct` instructions; sums, differences, word order and list facts appear only as stories
//! ([`crate::recall`], which also teaches copying from the context), never as an instruction
//! with its answer. It does use every token the tasks use
//! (SQL keywords and fragments such as `age > 30` or `city = 'Paris'` in prose about SQL, the ad
//! templates' phrases in other sentences, table and column names, numbers, products, short
//! assistant replies that start with a bare word or number), so the frozen embeddings and output
//! layer a LoRA adapter builds on are trained for all of them (a test checks every task token
//! but the six prompt markers occurs in the corpus). The base alone therefore
//! scores low on all three tasks and each adapter has only the mapping to learn.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::ad::TEMPLATES;
use crate::instruct::chatml_prompt;
use crate::sql::{TABLES, all_columns, number_columns, text_values};
use crate::vocab::{
    CAR_MODELS, CATEGORIES, CITIES, COLORS, COURSES, FLIGHT_CODES, NAMES, PRODUCT_ITEMS,
    PRODUCT_MODIFIERS, TONES, WORDS, capitalize, pick, pick_distinct, product,
};

/// Stream of the corpus' ChaCha8 generator (the tasks use streams 0–5).
const STREAM: u64 = 100;

/// Sentences about people, places, products, cars, flights and things.
fn fact(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, NAMES);
    let city = pick(rng, CITIES);
    let n = rng.random_range(0..=99);
    match rng.random_range(0..20) {
        0 => format!("{name} lives in {city} and is {n} years old."),
        1 => format!(
            "{name} studies {} and has a grade of {n}.",
            pick(rng, COURSES)
        ),
        2 => format!("{name} earns {n} a month and works in {city}."),
        3 => format!("The {} costs {n} dollars in {city}.", product(rng)),
        4 => format!(
            "{} are in the {} category.",
            capitalize(&product(rng)),
            pick(rng, CATEGORIES)
        ),
        5 => format!(
            "We have {n} {} in stock in {city}.",
            pick(rng, PRODUCT_ITEMS)
        ),
        6 => format!(
            "The {} {} was made in {}.",
            pick(rng, COLORS),
            pick(rng, CAR_MODELS),
            rng.random_range(1990..=2024)
        ),
        7 => format!(
            "Flight {} leaves from {city} and flies to {}.",
            pick(rng, FLIGHT_CODES),
            pick(rng, CITIES)
        ),
        8 => format!("Birds fly to {city} in spring, and {name} likes to watch them."),
        9 => {
            let w = pick_distinct(rng, WORDS, 3);
            format!("{name} saw a {} and a {} near the {}.", w[0], w[1], w[2])
        }
        10 => {
            let w = pick_distinct(rng, WORDS, 2);
            format!("{} and {} are words {name} knows.", capitalize(w[0]), w[1])
        }
        11 => format!(
            "Students who study {} in {city} are younger than staff.",
            pick(rng, COURSES)
        ),
        12 => format!(
            "Some cars cost more than {n} and some cost less than {}.",
            rng.random_range(0..=99)
        ),
        13 => format!(
            "Room {n} has fewer than {} chairs.",
            rng.random_range(0..=20)
        ),
        14 => format!(
            "A {} {} was painted {} in {}.",
            pick(rng, COLORS),
            pick(rng, CAR_MODELS),
            pick(rng, COLORS),
            rng.random_range(1990..=2024)
        ),
        15 => {
            let w = pick_distinct(rng, WORDS, 3);
            format!(
                "The {} is above the {}, and the {} is below it.",
                w[0], w[1], w[2]
            )
        }
        16 => format!(
            "Staff earn more than students in {city}, and {name} is older than {}.",
            pick(rng, NAMES)
        ),
        17 => format!(
            "Flights leave from {city} every day at {}.",
            rng.random_range(0..=20)
        ),
        18 => format!(
            "The cars were made in {}, and the flights were new.",
            rng.random_range(1990..=2024)
        ),
        _ => format!(
            "{name} and {} met in {city} after {} years.",
            pick(rng, NAMES),
            rng.random_range(0..=20)
        ),
    }
}

/// Prose about tables and SQL: the keywords and names, never a question with its query.
fn tables(rng: &mut ChaCha8Rng) -> String {
    let table = pick(rng, TABLES);
    let cols = all_columns();
    let col = pick(rng, &cols);
    match rng.random_range(0..13) {
        0 => format!(
            "The {} table has the schema {}.",
            table.name,
            table.schema()
        ),
        1 => format!(
            "In SQL, SELECT picks the columns and FROM names the table, like {}.",
            table.name
        ),
        2 => "A WHERE clause keeps some rows, and AND joins two conditions.".to_string(),
        10 => {
            let (text_col, v) = *pick(rng, &text_values());
            let (num_col, lo, hi) = *pick(rng, &number_columns());
            let n = rng.random_range(lo..=hi);
            format!("A condition like {num_col} > {n} or {text_col} = '{v}' keeps some rows.")
        }
        11 => {
            let (_, a) = *pick(rng, &text_values());
            let (_, b) = *pick(rng, &text_values());
            format!("Text values go between quotes, like '{a}' and '{b}'.")
        }
        12 => format!(
            "The schema {} has {} columns.",
            table.schema(),
            table.columns.len()
        ),
        3 => "In SQL, COUNT(*) counts rows, ORDER BY sorts them, and DESC means descending order."
            .to_string(),
        4 => format!(
            "The column {col} is in the {} table or another one.",
            table.name
        ),
        5 => format!("Every schema lists a table and its columns, such as {col}."),
        6 => format!(
            "A question about {} may ask which rows have a high {col}.",
            table.name
        ),
        8 => "The signs =, > and < compare values in SQL, and * means every column.".to_string(),
        7 => "Text values in SQL go between quotes, and each query ends with a semicolon."
            .to_string(),
        _ => format!(
            "{} wrote about all the {} ordered by {col} in a list.",
            pick(rng, NAMES),
            table.name
        ),
    }
}

/// Sentences that use the ad templates' words and the tones, never a tone with its ad.
fn adverts(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, NAMES);
    let city = pick(rng, CITIES);
    let p = product(rng);
    match rng.random_range(0..12) {
        0 => format!("{name} had fun on every step of the walk in {city}."),
        1 => format!("The {p} was crafted for those who expect the best."),
        2 => format!("Last chance to see {city} today before the summer is gone!"),
        3 => format!("Slow down, {name}, the road to {city} is made for quiet days."),
        4 => format!(
            "{name} built a tough {} and made it to win.",
            pick(rng, PRODUCT_ITEMS)
        ),
        5 => format!(
            "Discover {city} with {name} and get a {}.",
            pick(rng, PRODUCT_ITEMS)
        ),
        6 => format!(
            "A product can have a {} tone or a {} one in an ad.",
            pick(rng, TONES),
            pick(rng, TONES)
        ),
        7 => format!("{} was a good day for {name}.", capitalize(&p)),
        8 => format!(
            "Built in {city}. Made by {name}. They are {} and {}.",
            pick(rng, TONES),
            pick(rng, TONES)
        ),
        9 => format!(
            "{} {} from {city} are on sale, and the {} ones are too.",
            capitalize(PRODUCT_MODIFIERS[rng.random_range(0..PRODUCT_MODIFIERS.len())]),
            pick(rng, PRODUCT_ITEMS),
            pick(rng, PRODUCT_MODIFIERS)
        ),
        10 => {
            // A template's words in another order: its vocabulary without the tone → ad mapping.
            let (_, t) = pick(rng, TEMPLATES);
            let mut words: Vec<String> = t
                .split_whitespace()
                .map(|w| {
                    w.trim_matches(|c: char| !c.is_alphanumeric())
                        .to_lowercase()
                })
                .filter(|w| !w.is_empty() && w != "p")
                .collect();
            words.sort();
            format!("Words like {} are used in many ads.", words.join(", "))
        }
        _ => format!("Get the {p} in {city} today."),
    }
}

/// Sentences that use the instructions' words without instructions or answers.
fn words(rng: &mut ChaCha8Rng) -> String {
    let name = pick(rng, NAMES);
    let w = pick(rng, WORDS);
    let n = rng.random_range(0..=20);
    match rng.random_range(0..14) {
        0 => format!("{name} likes to add, subtract, sort and count things."),
        1 => format!("{name} wrote the plus and minus signs {n} times, and that was that."),
        2 => format!("Put the {w} on the table, {name}."),
        3 => format!("Say hello to {name}, and give the {w} back."),
        4 => format!("Repeat after me: the {w} is in the house."),
        5 => format!("The last word of the story was {w}."),
        6 => "Sort the books alphabetically, or in alphabetical order by word.".to_string(),
        7 => format!("Count the birds by the {w}, then add the rest."),
        8 => format!("What is a {w}? It is a word in this list of {n} words."),
        10 => format!("Add salt to the soup, {name}."),
        11 => format!("Give the {w} to {name}, and keep the rest."),
        12 => format!("List the things you need for {n} days, {name}."),
        13 => format!("Which {w} is the best? Nobody knows, {name}."),
        _ => format!("Subtract nothing from the plan, {name}; these words are all {w}."),
    }
}

/// A short ChatML exchange (one or two turns) of small talk.
fn chat(rng: &mut ChaCha8Rng) -> String {
    let turns = rng.random_range(1..=2);
    let mut text = String::new();
    for _ in 0..turns {
        let name = pick(rng, NAMES);
        let city = pick(rng, CITIES);
        let w = pick(rng, WORDS);
        let (user, assistant) = match rng.random_range(0..14) {
            0 => (
                "Hello!".to_string(),
                "Hello! How can I help you today?".to_string(),
            ),
            1 => (
                format!("Where does {name} live?"),
                format!("{name} lives in {city}."),
            ),
            2 => (
                format!("Tell me about {city}."),
                format!("{city} is a city with a {w} and a river."),
            ),
            3 => (
                "What do you like?".to_string(),
                format!("I like the {w} and the {}.", pick(rng, WORDS)),
            ),
            4 => ("Thank you!".to_string(), "You are welcome.".to_string()),
            5 => (
                format!("Is the {} nice?", product(rng)),
                format!("Yes, it is {}.", pick(rng, TONES)),
            ),
            6 => (
                "Which city do you like?".to_string(),
                format!("I like {city}."),
            ),
            7 => (
                format!("How many {} do you have?", pick(rng, PRODUCT_ITEMS)),
                format!("I have {}.", rng.random_range(0..=20)),
            ),
            8 => {
                let w = pick_distinct(rng, WORDS, 3);
                (
                    "What do you see?".to_string(),
                    format!("{}, {} and a {}.", w[0], w[1], w[2]),
                )
            }
            9 => (
                format!("How old is {name}?"),
                format!("{}.", rng.random_range(0..=20)),
            ),
            10 => (
                "What is your favourite colour?".to_string(),
                format!("{}.", pick(rng, COLORS)),
            ),
            11 => (
                format!("What does {name} study?"),
                format!("{}, I think.", pick(rng, COURSES)),
            ),
            12 => {
                let c = pick_distinct(rng, CATEGORIES, 2);
                (
                    "What does the shop sell?".to_string(),
                    format!("{} and {}.", c[0], c[1]),
                )
            }
            _ => (
                "Good morning!".to_string(),
                format!("Good morning, {name}!"),
            ),
        };
        text.push_str(&chatml_prompt(&user));
        text.push_str(&assistant);
        text.push_str("<|im_end|>\n");
    }
    text.trim_end().to_string()
}

/// `n` documents of base-model text, the same for the same `seed`: one to three sentences,
/// (three documents in eight) a recall document ([`crate::recall`]), or (one in eight) a ChatML
/// exchange of one or two turns. See the module docs for what it excludes.
pub fn base_corpus(seed: u64, n: usize) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM);
    (0..n)
        .map(|_| {
            match rng.random_range(0..8) {
                0 => return chat(&mut rng),
                1 | 2 => return crate::recall::recall(&mut rng),
                3 => {
                    let (prefix, copy) = crate::recall::list_copy(&mut rng);
                    return prefix + &copy;
                }
                _ => {}
            }
            // One to three sentences, so sentence-initial words also follow a space.
            let sentences = rng.random_range(1..=3);
            (0..sentences)
                .map(|_| match rng.random_range(0..6) {
                    0..=2 => fact(&mut rng),
                    3 => tables(&mut rng),
                    4 => adverts(&mut rng),
                    _ => words(&mut rng),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use super::*;
    use crate::{Split, Task, generate};

    /// Words of `text`, punctuation stripped (ChatML markers removed first).
    fn words_of(text: &str) -> Vec<String> {
        text.replace("<|im_start|>", " ")
            .replace("<|im_end|>", " ")
            .split(|c: char| c.is_whitespace() || ",.?!:;()'".contains(c))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn corpus_is_deterministic_and_varied() {
        let a = base_corpus(1, 500);
        assert_eq!(a, base_corpus(1, 500));
        assert_ne!(a, base_corpus(2, 500));
        let distinct: HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 400, "{}", distinct.len());
        assert!(a.iter().any(|d| d.starts_with("<|im_start|>user\n")));
    }

    #[test]
    fn corpus_knows_every_word_of_the_tasks() {
        let corpus: HashSet<String> = base_corpus(0, 20_000)
            .iter()
            .flat_map(|d| words_of(d))
            .collect();
        let mut missing = HashSet::new();
        for task in Task::ALL {
            for ex in generate(task, Split::Train, 0, 3000) {
                for w in words_of(&ex.prompt)
                    .into_iter()
                    .chain(words_of(&ex.completion))
                {
                    if !corpus.contains(&w) {
                        missing.insert(w);
                    }
                }
            }
        }
        // Markers of the prompt formats are left out of the corpus on purpose.
        for marker in ["Schema", "Question", "SQL", "Product", "Tone", "Ad"] {
            missing.remove(marker);
        }
        let mut missing: Vec<_> = missing.into_iter().collect();
        missing.sort();
        assert!(missing.is_empty(), "not in the corpus: {missing:?}");
    }

    #[test]
    fn corpus_holds_no_task_mapping() {
        let corpus = base_corpus(0, 20_000);
        for doc in &corpus {
            for marker in ["Schema:", "Question:", "SQL:", "Product:", "Tone:", "Ad:"] {
                assert!(!doc.contains(marker), "{marker} in {doc:?}");
            }
            assert!(!doc.contains("SELECT name"), "{doc:?}");
            for table in TABLES {
                assert!(!doc.contains(&format!("FROM {}", table.name)), "{doc:?}");
            }
            for turn in doc.split("<|im_start|>user\n").skip(1) {
                let user = turn.split("<|im_end|>").next().unwrap();
                assert!(
                    crate::instruct::tests::solve(user).is_none(),
                    "instruction in the corpus: {user:?}"
                );
            }
        }
        let completions: HashSet<String> = Task::ALL
            .into_iter()
            .flat_map(|t| generate(t, Split::Train, 0, 500))
            .filter(|e| e.task != Task::Instruct)
            .map(|e| e.completion.trim().to_string())
            .collect();
        for doc in &corpus {
            for c in &completions {
                assert!(!doc.contains(c.as_str()), "{c:?} in {doc:?}");
            }
        }
    }
}

//! The `sql` task: a question over a schema stated in the prompt, answered with one SQL query.
//!
//! ```text
//! Schema: staff(name, city, age, salary)
//! Question: Which staff live in Paris and are older than 30?
//! SQL:
//! ```
//! → ` SELECT name FROM staff WHERE city = 'Paris' AND age > 30;`
//!
//! Five tables, five query patterns (the key column under one or two conditions, two columns
//! under one condition, `COUNT(*)` under one condition, the key column `ORDER BY` a number
//! column, ascending or `DESC`). Each column has one fixed phrase per comparison ("live in
//! Paris", "are older than 30"), and every value in the query is copied from the question.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::vocab::{CATEGORIES, CITIES, COLORS, COURSES, pick, pick_distinct};

/// What a column holds and how a question talks about it.
#[derive(Debug, Clone, Copy)]
pub enum ColumnKind {
    /// The identifying column: selected, never filtered on.
    Key,
    /// A text column compared for equality; `phrase` has `{}` where the value goes.
    Text {
        /// Values drawn for conditions.
        values: &'static [&'static str],
        /// The question's phrase for `column = 'value'`.
        phrase: &'static str,
    },
    /// An integer column compared with `>` or `<`.
    Number {
        /// Smallest value drawn.
        lo: u32,
        /// Largest value drawn.
        hi: u32,
        /// The question's phrase for `column > n`.
        above: &'static str,
        /// The question's phrase for `column < n`.
        below: &'static str,
    },
}

/// One column of a table.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Column name.
    pub name: &'static str,
    /// What it holds.
    pub kind: ColumnKind,
}

/// One table of the task.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    /// Table name, also the plural noun the questions use.
    pub name: &'static str,
    /// Columns; the first is the key.
    pub columns: &'static [Column],
}

impl Table {
    /// `name(col, col, ...)`, as the prompt states it.
    pub fn schema(&self) -> String {
        let cols = self.columns.iter().map(|c| c.name).collect::<Vec<_>>();
        format!("{}({})", self.name, cols.join(", "))
    }

    fn key(&self) -> &'static str {
        self.columns[0].name
    }

    fn filterable(&self) -> Vec<&Column> {
        self.columns
            .iter()
            .filter(|c| !matches!(c.kind, ColumnKind::Key))
            .collect()
    }

    fn numeric(&self) -> Vec<&Column> {
        self.columns
            .iter()
            .filter(|c| matches!(c.kind, ColumnKind::Number { .. }))
            .collect()
    }
}

const fn text(name: &'static str, values: &'static [&'static str], phrase: &'static str) -> Column {
    Column {
        name,
        kind: ColumnKind::Text { values, phrase },
    }
}

const fn number(
    name: &'static str,
    lo: u32,
    hi: u32,
    above: &'static str,
    below: &'static str,
) -> Column {
    Column {
        name,
        kind: ColumnKind::Number {
            lo,
            hi,
            above,
            below,
        },
    }
}

const fn key(name: &'static str) -> Column {
    Column {
        name,
        kind: ColumnKind::Key,
    }
}

/// The tables questions are asked about.
pub const TABLES: &[Table] = &[
    Table {
        name: "staff",
        columns: &[
            key("name"),
            text("city", CITIES, "live in {}"),
            number("age", 20, 65, "are older than {}", "are younger than {}"),
            number("salary", 30, 90, "earn more than {}", "earn less than {}"),
        ],
    },
    Table {
        name: "students",
        columns: &[
            key("name"),
            text("course", COURSES, "study {}"),
            number(
                "grade",
                40,
                99,
                "have a grade above {}",
                "have a grade below {}",
            ),
            number("age", 18, 30, "are older than {}", "are younger than {}"),
        ],
    },
    Table {
        name: "products",
        columns: &[
            key("title"),
            text("category", CATEGORIES, "are in the {} category"),
            number("price", 5, 99, "cost more than {}", "cost less than {}"),
            number(
                "stock",
                0,
                50,
                "have more than {} in stock",
                "have fewer than {} in stock",
            ),
        ],
    },
    Table {
        name: "cars",
        columns: &[
            key("model"),
            text("color", COLORS, "are {}"),
            number(
                "year",
                1990,
                2024,
                "were made after {}",
                "were made before {}",
            ),
            number("price", 5, 99, "cost more than {}", "cost less than {}"),
        ],
    },
    Table {
        name: "flights",
        columns: &[
            key("code"),
            text("origin", CITIES, "leave from {}"),
            text("destination", CITIES, "fly to {}"),
            number("price", 50, 99, "cost more than {}", "cost less than {}"),
        ],
    },
];

/// A drawn condition: the question's phrase and the SQL predicate.
struct Condition {
    phrase: String,
    sql: String,
}

fn condition(rng: &mut ChaCha8Rng, column: &Column) -> Condition {
    match column.kind {
        ColumnKind::Text { values, phrase } => {
            let v = pick(rng, values);
            Condition {
                phrase: phrase.replace("{}", v),
                sql: format!("{} = '{v}'", column.name),
            }
        }
        ColumnKind::Number {
            lo,
            hi,
            above,
            below,
        } => {
            let n = rng.random_range(lo..=hi);
            let (phrase, op) = if rng.random_bool(0.5) {
                (above, '>')
            } else {
                (below, '<')
            };
            Condition {
                phrase: phrase.replace("{}", &n.to_string()),
                sql: format!("{} {op} {n}", column.name),
            }
        }
        // Never drawn: `filterable` leaves the key out.
        ColumnKind::Key => Condition {
            phrase: String::new(),
            sql: String::new(),
        },
    }
}

/// Draws one `(prompt, completion)` pair.
pub fn sample(rng: &mut ChaCha8Rng) -> (String, String) {
    let table = pick(rng, TABLES);
    let (t, key) = (table.name, table.key());
    let filterable = table.filterable();
    let (question, sql) = match rng.random_range(0..12) {
        0..=2 => {
            let column = pick(rng, &filterable);
            let c = condition(rng, column);
            (
                format!("Which {t} {}?", c.phrase),
                format!("SELECT {key} FROM {t} WHERE {};", c.sql),
            )
        }
        3..=5 => {
            let cols = pick_distinct(rng, &filterable, 2);
            let (a, b) = (condition(rng, cols[0]), condition(rng, cols[1]));
            (
                format!("Which {t} {} and {}?", a.phrase, b.phrase),
                format!("SELECT {key} FROM {t} WHERE {} AND {};", a.sql, b.sql),
            )
        }
        6..=7 => {
            let cols = pick_distinct(rng, table.columns, 2);
            let column = pick(rng, &filterable);
            let c = condition(rng, column);
            let (a, b) = (cols[0].name, cols[1].name);
            (
                format!("List the {a} and {b} of {t} that {}.", c.phrase),
                format!("SELECT {a}, {b} FROM {t} WHERE {};", c.sql),
            )
        }
        8..=9 => {
            let column = pick(rng, &filterable);
            let c = condition(rng, column);
            (
                format!("How many {t} {}?", c.phrase),
                format!("SELECT COUNT(*) FROM {t} WHERE {};", c.sql),
            )
        }
        _ => {
            let col = pick(rng, &table.numeric()).name;
            if rng.random_bool(0.5) {
                (
                    format!("List the {key} of all {t} ordered by {col}."),
                    format!("SELECT {key} FROM {t} ORDER BY {col};"),
                )
            } else {
                (
                    format!("List the {key} of all {t} ordered by {col} descending."),
                    format!("SELECT {key} FROM {t} ORDER BY {col} DESC;"),
                )
            }
        }
    };
    (
        format!("Schema: {}\nQuestion: {question}\nSQL:", table.schema()),
        format!(" {sql}"),
    )
}

/// `(column, value)` for every value a text column can be compared with, for the corpus.
pub fn text_values() -> Vec<(&'static str, &'static str)> {
    TABLES
        .iter()
        .flat_map(|t| t.columns.iter())
        .flat_map(|c| match c.kind {
            ColumnKind::Text { values, .. } => values.iter().map(|v| (c.name, *v)).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// `(column, lo, hi)` of every number column, for the corpus.
pub fn number_columns() -> Vec<(&'static str, u32, u32)> {
    TABLES
        .iter()
        .flat_map(|t| t.columns.iter())
        .filter_map(|c| match c.kind {
            ColumnKind::Number { lo, hi, .. } => Some((c.name, lo, hi)),
            _ => None,
        })
        .collect()
}

/// Names of the tables' columns, for the corpus.
pub fn all_columns() -> Vec<&'static str> {
    let mut cols: Vec<_> = TABLES
        .iter()
        .flat_map(|t| t.columns.iter().map(|c| c.name))
        .collect();
    cols.sort_unstable();
    cols.dedup();
    cols
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use rand::SeedableRng;

    use super::*;

    /// An independent reading of one example: the prompt's schema and question, and the checks
    /// that the query is the question's.
    pub(crate) fn check(prompt: &str, completion: &str) -> Result<(), String> {
        let rest = prompt.strip_prefix("Schema: ").ok_or("no schema")?;
        let (schema, rest) = rest.split_once("\nQuestion: ").ok_or("no question")?;
        let question = rest.strip_suffix("\nSQL:").ok_or("no SQL: marker")?;
        let (table, cols) = schema.split_once('(').ok_or("bad schema")?;
        let cols: Vec<&str> = cols.trim_end_matches(')').split(", ").collect();
        let sql = completion
            .strip_prefix(" SELECT ")
            .and_then(|s| s.strip_suffix(';'))
            .ok_or("not ` SELECT ...;`")?;
        let (selected, rest) = sql.split_once(" FROM ").ok_or("no FROM")?;
        let rest = rest
            .strip_prefix(table)
            .ok_or("FROM is not the schema's table")?;
        if selected == "COUNT(*)" {
            if !question.starts_with("How many ") {
                return Err("COUNT without `How many`".into());
            }
        } else {
            for col in selected.split(", ") {
                if !cols.contains(&col) {
                    return Err(format!("selected {col} not in schema"));
                }
            }
        }
        if let Some(order) = rest.strip_prefix(" ORDER BY ") {
            let (col, desc) = match order.strip_suffix(" DESC") {
                Some(col) => (col, true),
                None => (order, false),
            };
            let want = if desc {
                format!("ordered by {col} descending.")
            } else {
                format!("ordered by {col}.")
            };
            if !cols.contains(&col) || !question.ends_with(&want) {
                return Err("ORDER BY does not match the question".into());
            }
            return Ok(());
        }
        let conds = rest.strip_prefix(" WHERE ").ok_or("no WHERE")?;
        let conds: Vec<&str> = conds.split(" AND ").collect();
        if conds.len() == 2 && !question.contains(" and ") {
            return Err("two conditions, one phrase".into());
        }
        for cond in conds {
            let mut parts = cond.splitn(3, ' ');
            let (col, op, value) = (
                parts.next().ok_or("empty")?,
                parts.next().ok_or("no op")?,
                parts.next().ok_or("no value")?,
            );
            if !cols.contains(&col) || !["=", ">", "<"].contains(&op) {
                return Err(format!("bad condition {cond}"));
            }
            let bare = value.trim_matches('\'');
            let phrase_has = question.split([' ', '?', '.']).any(|w| w == bare);
            if !phrase_has {
                return Err(format!("value {value} not in the question"));
            }
            if (op == "=") != value.starts_with('\'') {
                return Err(format!("text must be quoted and numbers not: {cond}"));
            }
        }
        Ok(())
    }

    #[test]
    fn queries_are_the_questions() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut patterns = std::collections::HashSet::new();
        for _ in 0..3000 {
            let (p, c) = sample(&mut rng);
            check(&p, &c).unwrap_or_else(|e| panic!("{e}: {p:?} -> {c:?}"));
            patterns.insert(
                ["COUNT", " AND ", "DESC", "ORDER", ", "]
                    .iter()
                    .map(|k| c.contains(k))
                    .collect::<Vec<_>>(),
            );
        }
        assert!(patterns.len() >= 5, "{patterns:?}");
    }

    #[test]
    fn schema_is_stated_as_in_the_brief() {
        assert_eq!(TABLES[0].schema(), "staff(name, city, age, salary)");
        check(
            "Schema: staff(name, city, age, salary)\nQuestion: Which staff live in Paris and are older than 30?\nSQL:",
            " SELECT name FROM staff WHERE city = 'Paris' AND age > 30;",
        )
        .unwrap();
        assert!(
            check(
                "Schema: staff(name, city, age, salary)\nQuestion: Which staff live in Rome?\nSQL:",
                " SELECT name FROM staff WHERE city = 'Paris';",
            )
            .is_err()
        );
    }
}

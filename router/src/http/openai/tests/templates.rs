//! Chat templates: minijinja renders the committed fixtures exactly like transformers'
//! `apply_chat_template` (goldens from `scripts/chat_template_goldens.py`), and templates load
//! from every place Hugging Face repositories keep them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::super::template::{ChatTemplate, TemplateError, TemplateMessage, template_in_config};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

#[derive(Deserialize)]
struct Goldens {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    fixture: String,
    conversation: String,
    messages: Vec<Message>,
    rendered: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn fixture_template(name: &str) -> ChatTemplate {
    let path = fixtures().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    let config: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    let source = template_in_config(&config).expect("a chat template");
    ChatTemplate::new(source, &config).expect("compiles")
}

fn messages(pairs: &[(&str, &str)]) -> Vec<TemplateMessage> {
    pairs
        .iter()
        .map(|(role, content)| TemplateMessage {
            role: role.to_string(),
            content: content.to_string(),
            name: None,
        })
        .collect()
}

#[test]
fn renders_like_transformers() {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("goldens");
    let goldens: Goldens = serde_json::from_str(&text).expect("goldens JSON");
    let mut fixtures_seen = std::collections::BTreeSet::new();
    assert!(goldens.cases.len() >= 20);
    for case in &goldens.cases {
        fixtures_seen.insert(case.fixture.clone());
        let template = fixture_template(&case.fixture);
        let msgs: Vec<TemplateMessage> = case
            .messages
            .iter()
            .map(|m| TemplateMessage {
                role: m.role.clone(),
                content: m.content.clone(),
                name: None,
            })
            .collect();
        let what = format!("{} / {}", case.fixture, case.conversation);
        match (&case.rendered, &case.error) {
            (Some(expected), None) => {
                assert_eq!(&template.render(&msgs).expect(&what), expected, "{what}")
            }
            (None, Some(message)) => assert_eq!(
                template.render(&msgs),
                Err(TemplateError::Raised(message.clone())),
                "{what}"
            ),
            _ => panic!("{what}: a golden has `rendered` or `error`"),
        }
    }
    let expected = ["chatml", "llama3", "mistral", "pycompat", "zephyr"];
    assert_eq!(fixtures_seen.into_iter().collect::<Vec<_>>(), expected);
}

#[test]
fn templates_load_from_the_tokenizer_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |template: serde_json::Value| {
        json!({"bos_token": {"content": "<s>", "special": true}, "chat_template": template})
            .to_string()
    };
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    let render =
        || ChatTemplate::load(dir.path()).and_then(|t| t.render(&messages(&[("user", "hi")])));

    // No tokenizer_config.json, then one without a template.
    assert_eq!(render(), Err(TemplateError::Missing));
    write(
        "tokenizer_config.json",
        &json!({"bos_token": "<s>"}).to_string(),
    );
    assert_eq!(render(), Err(TemplateError::Missing));
    // A string; an added-token object as bos_token.
    write(
        "tokenizer_config.json",
        &config(json!("{{ bos_token }}[{{ messages[0].content }}]")),
    );
    assert_eq!(render().as_deref(), Ok("<s>[hi]"));
    // A list of named templates: `default` is used.
    let list = json!([{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default {{ messages | length }}"}]);
    write("tokenizer_config.json", &config(list));
    assert_eq!(render().as_deref(), Ok("default 1"));
    let no_default = json!([{"name": "tool_use", "template": "tools"}]);
    write("tokenizer_config.json", &config(no_default));
    assert!(matches!(render(), Err(TemplateError::Broken(m)) if m.contains("`default`")));
    // chat_template.jinja wins over the configuration.
    write(
        super::super::template::JINJA_FILE,
        "jinja {{ bos_token }}\n",
    );
    assert_eq!(render().as_deref(), Ok("jinja <s>"));
    // Syntax errors and unreadable configurations are reported, not panics.
    write(super::super::template::JINJA_FILE, "{% if %}");
    assert!(matches!(render(), Err(TemplateError::Broken(_))));
    write("tokenizer_config.json", "{not json");
    assert!(matches!(render(), Err(TemplateError::Broken(_))));
}

#[test]
fn helpers_match_transformers() {
    let compile = |source: &str| ChatTemplate::new(source.into(), &json!({})).expect("compiles");
    let one = messages(&[("user", "a \"b\" <c> é")]);
    let t = compile(
        "{{ messages[0] | tojson }}|{{ none | tojson }}|{{ [1, 2.5, true] | tojson(indent=1) }}",
    );
    assert_eq!(
        t.render(&one).as_deref(),
        Ok("{\"role\": \"user\", \"content\": \"a \\\"b\\\" <c> é\"}|null|[\n 1,\n 2.5,\n true\n]")
    );
    let t = compile(
        "{{ strftime_now('%Y') | length }} {{ tools is none }} {{ add_generation_prompt }}",
    );
    // Booleans print the Python way, as in transformers.
    assert_eq!(t.render(&one).as_deref(), Ok("4 True True"));
    let t = compile(
        "{{ '  x  '.strip() }}{{ 'abc'.startswith('ab') }}{{ 'A-B'.lower().split('-') | join('+') }}",
    );
    assert_eq!(t.render(&one).as_deref(), Ok("xTruea+b"));
    // Undefined special tokens render empty, as in transformers.
    assert_eq!(
        compile("[{{ bos_token }}]").render(&one).as_deref(),
        Ok("[]")
    );
    // Render errors other than raise_exception are client errors too.
    let e = compile("{{ messages[0].content.no_such_method() }}").render(&one);
    assert!(matches!(&e, Err(TemplateError::Render(_))), "{e:?}");
    assert!(e.err().is_some_and(|e| e.is_client_error()));
}

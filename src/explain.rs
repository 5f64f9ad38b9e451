//! `plumb explain [NAME]`: every option of a stage's, evaluator's or reward's section, or
//! of the recipe's `run:` section, with its type, default and doc. Plugins describe their
//! sections across the C boundary as JSON Schema (their config structs derive
//! `schemars::JsonSchema`); `plumb_host::recipe::options` reads it.
use plumb_host::plugin::Kind;
use plumb_host::recipe::options::{options, OptionDoc};
use plumb_host::recipe::RunSpec;

use crate::Failure;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// A stage, evaluator or reward as recipes name it (`sft.sft`, `rlhf.ppo`,
    /// `rlhf.length`), or `run` for the recipe's `run:` section (the default).
    pub name: Option<String>,
}

pub fn run(args: &ExplainArgs) -> Result<(), Failure> {
    let registry = crate::plugins::installed();
    let name = args.name.as_deref().unwrap_or("run");
    if name == "run" {
        let schema = serde_json::to_value(schemars::schema_for!(RunSpec))
            .map_err(|e| Failure::Internal(format!("the run section's schema: {e}")))?;
        print!("{}", render("run: the recipe's `run:` section", "Settings of the run as a whole.", &options(&schema)));
        if args.name.is_none() {
            let mut names = Vec::new();
            for kind in [Kind::Stage, Kind::Evaluator, Kind::Reward] {
                names.extend(registry.names(kind));
            }
            if !names.is_empty() {
                println!("\n`plumb explain NAME` for the options of one of: {}", names.join(", "));
            }
        }
        return Ok(());
    }
    let described = registry.described(name).map_err(Failure::User)?;
    let schema =
        described.schema().map_err(|e| Failure::Internal(format!("`{name}` could not describe its options: {e}")))?;
    let title = format!(
        "{} {} (plugin {} {}, {})",
        described.kind.noun(),
        described.uses,
        described.plugin.name,
        described.plugin.version,
        described.plugin.path.display()
    );
    let about = match described.kind {
        Kind::Reward => format!("{}. Its options go under `config:` of a `rewards:` entry.", described.description),
        _ => format!("{}. Its options go under `config:` of a `stages:` entry.", described.description),
    };
    print!("{}", render(&title, &about, &options(&schema)));
    Ok(())
}

/// The title, what it is, then two lines per option: `key: type = default` (or
/// `(required)`), and its doc, indented. Nested keys are dotted (`optimizer.lr`).
pub fn render(title: &str, about: &str, options: &[OptionDoc]) -> String {
    let mut out = format!("{title}\n{about}\n");
    if options.is_empty() {
        out += "\nIt has no options.\n";
        return out;
    }
    out += "\nKeys (nested mappings written `a.b` here), each with its type, default and meaning:\n\n";
    for option in options {
        let mut line = format!("{}: {}", option.key, option.kind);
        match (&option.default, option.required) {
            (_, true) => line += " (required)",
            (Some(default), false) if !option.section || default == "null" => line += &format!(" = {default}"),
            // A section on by default: its keys' defaults follow.
            (Some(_), false) => line += " = {…}",
            (None, false) if !option.section => line += " (optional)",
            _ => {}
        }
        let doc = if option.doc.is_empty() { "(no description)" } else { &option.doc };
        out += &format!("{line}\n    {doc}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_option_is_a_line_of_key_type_and_default_then_its_doc() {
        let option =
            |key: &str, kind: &str, default: Option<&str>, required: bool, section: bool, doc: &str| OptionDoc {
                key: key.into(),
                kind: kind.into(),
                default: default.map(Into::into),
                required,
                section,
                doc: doc.into(),
            };
        let text = render(
            "stage x.y (plugin x)",
            "Does y.",
            &[
                option("data", "string", None, true, false, "A file."),
                option("optimizer", "mapping", None, false, true, "AdamW."),
                option("optimizer.lr", "number", Some("0.001"), false, false, "The peak learning rate."),
                option("note", "string | null", Some("null"), false, false, ""),
                option("near", "mapping | null", Some("{rows: 8}"), false, true, "Near duplicates; null: off."),
                option("far", "mapping | null", Some("null"), false, true, "Far ones."),
            ],
        );
        assert_eq!(
            text,
            "stage x.y (plugin x)\nDoes y.\n\n\
             Keys (nested mappings written `a.b` here), each with its type, default and meaning:\n\n\
             data: string (required)\n    A file.\n\
             optimizer: mapping\n    AdamW.\n\
             optimizer.lr: number = 0.001\n    The peak learning rate.\n\
             note: string | null = null\n    (no description)\n\
             near: mapping | null = {…}\n    Near duplicates; null: off.\n\
             far: mapping | null = null\n    Far ones.\n"
        );
    }
}

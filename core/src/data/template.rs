//! Which chat template formats a stage's conversations (`template:` in a recipe): the
//! model's own, a built-in one for models that ship none, or a Jinja file. SFT renders its
//! examples with it, the reward-model stage its preference pairs; either saves it with the
//! tokenizer so the trained model is used with the text it was trained on.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// `### Instruction:` / `### Response:` blocks, ending each response with EOS: for models
/// that ship no chat template (such as the pretrain stage's).
pub const DEFAULT_TEMPLATE: &str = "{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] }}\n\n\
{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n\
{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}\
{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}";

/// ChatML, as Qwen and many others use it (without a default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Which chat template formats the data (`template:` in the recipe).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(from = "String", into = "String")]
pub enum TemplateChoice {
    /// The model's own (from its tokenizer files) when it has one, else `default`.
    #[default]
    Auto,
    /// The model's own; an error when it has none.
    Model,
    /// [`DEFAULT_TEMPLATE`].
    Default,
    /// [`CHATML_TEMPLATE`].
    Chatml,
    /// A Jinja file.
    File(PathBuf),
}

impl TemplateChoice {
    /// An error at `template` when it names a Jinja file that does not exist (any word
    /// that is not a built-in choice is taken for a file).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::File(path) if !path.is_file() => Err(Error::config(
                "template",
                format!(
                    "expected auto, model, default, chatml or an existing .jinja file; `{}` is none of them",
                    path.display()
                ),
            )),
            _ => Ok(()),
        }
    }
}

impl From<String> for TemplateChoice {
    fn from(s: String) -> Self {
        match s.as_str() {
            "auto" => Self::Auto,
            "model" => Self::Model,
            "default" => Self::Default,
            "chatml" => Self::Chatml,
            _ => Self::File(PathBuf::from(s)),
        }
    }
}

/// As a recipe writes it: the choice's word, or the file's path.
impl From<TemplateChoice> for String {
    fn from(choice: TemplateChoice) -> String {
        match choice {
            TemplateChoice::Auto => "auto".into(),
            TemplateChoice::Model => "model".into(),
            TemplateChoice::Default => "default".into(),
            TemplateChoice::Chatml => "chatml".into(),
            TemplateChoice::File(path) => path.display().to_string(),
        }
    }
}

/// Gives `tokenizer` the chosen template, so the saved model carries it; afterwards
/// `tokenizer.chat_template()` is it. `model_dir` names the model in errors.
pub fn use_template(choice: &TemplateChoice, tokenizer: &mut Tokenizer, model_dir: &Path) -> Result<()> {
    let builtin = |name: &str| PathBuf::from(format!("built-in `{name}` template"));
    match choice {
        TemplateChoice::Auto if tokenizer.chat_template().is_some() => {}
        TemplateChoice::Model => {
            if tokenizer.chat_template().is_none() {
                return Err(Error::config(
                    "template",
                    format!(
                        "the model in {} has no chat template; name one (default, chatml or a .jinja file)",
                        model_dir.display()
                    ),
                ));
            }
        }
        TemplateChoice::Auto | TemplateChoice::Default => {
            tokenizer.set_chat_template(DEFAULT_TEMPLATE, &builtin("default"))?;
        }
        TemplateChoice::Chatml => {
            tokenizer.set_chat_template(CHATML_TEMPLATE, &builtin("chatml"))?;
        }
        TemplateChoice::File(path) => {
            let source = std::fs::read_to_string(path)
                .map_err(|e| Error::config("template", format!("{}: {e}", path.display())))?;
            tokenizer.set_chat_template(&source, path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_file_that_does_not_exist_is_refused_at_its_key() {
        for word in ["auto", "model", "default", "chatml"] {
            TemplateChoice::from(word.to_owned()).validate().unwrap();
        }
        let err = TemplateChoice::from("chatlm".to_owned()).validate().unwrap_err().to_string();
        assert!(
            err.contains("template")
                && err.contains(
                    "expected auto, model, default, chatml or an existing .jinja file; `chatlm` is none of them"
                ),
            "{err}"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        TemplateChoice::from(file.path().display().to_string()).validate().unwrap();
    }
}

//! Prompting modes, as lm-evaluation-harness writes them (`Q: …\nA:` turns separated by a
//! blank line), and the eight exemplars of Wei et al. (2022), "Chain-of-Thought Prompting
//! Elicits Reasoning in Large Language Models" (<https://arxiv.org/abs/2201.11903>), in the
//! wording the harness's `gsm8k-cot` task uses.
//!
//! - `direct`: `Q: {question}\nA: The answer is` — the model writes only the number;
//! - `few_shot_direct`: k exemplars shown with their answer only, then the question;
//! - `zero_shot_cot`: `Q: {question}\nA: Let's think step by step.` (Kojima et al., 2022),
//!   optionally followed by a second pass `Therefore, the answer (arabic numerals) is`;
//! - `few_shot_cot`: k exemplars shown with their reasoning, then `Q: {question}\nA:`;
//! - `self_consistency`: the few-shot CoT prompt, sampled several times and voted.
//!
//! With `chat: true` the same turns are rendered by the model's chat template instead:
//! each exemplar as a user turn and an assistant turn, the question as the last user turn,
//! and the mode's answer opening after the generation prompt.
//!
//! That is the `lm_eval` [`Style`]. A model trained to answer in GSM8K's own format (its
//! reasoning, then `#### N`) is asked in the `gsm8k` style instead: `Question: …\nAnswer:`
//! turns (lm-evaluation-harness's `gsm8k` task; the bare question as a chat turn), exemplars
//! ending `#### N`, `direct` opening the answer with `####` and the reasoning modes opening
//! with nothing: the model reasons step by step the way it was taught.
use plumb_core::data::seeded_rng;
use plumb_core::rand::seq::index::sample;
use plumb_core::tokenizer::{ChatMessage, Tokenizer};
use plumb_core::Result;
use serde::{Deserialize, Serialize};

use crate::data::Problem;

/// One way of asking; a run evaluates a list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, PartialOrd, Ord, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Direct,
    FewShotDirect,
    ZeroShotCot,
    FewShotCot,
    SelfConsistency,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::FewShotDirect => "few_shot_direct",
            Mode::ZeroShotCot => "zero_shot_cot",
            Mode::FewShotCot => "few_shot_cot",
            Mode::SelfConsistency => "self_consistency",
        }
    }

    /// Whether this mode samples several chains (the others decode greedily, once).
    pub fn samples(self) -> bool {
        self == Mode::SelfConsistency
    }

    pub fn uses_exemplars(self) -> bool {
        matches!(self, Mode::FewShotDirect | Mode::FewShotCot | Mode::SelfConsistency)
    }

    /// What the prompt puts in the model's mouth after `A:`; it is part of the answer, so
    /// it is read with the generation ("The answer is" + " 18.").
    pub fn answer_opening(self, style: Style) -> &'static str {
        match (style, self) {
            (Style::LmEval, Mode::Direct | Mode::FewShotDirect) => "The answer is",
            (Style::LmEval, Mode::ZeroShotCot) => "Let's think step by step.",
            (Style::Gsm8k, Mode::Direct | Mode::FewShotDirect) => "####",
            (_, _) => "",
        }
    }
}

/// How questions and answers are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// `Q: …\nA:` turns, answers ending "The answer is N.", zero-shot CoT opening "Let's
    /// think step by step." (lm-evaluation-harness's `gsm8k-cot`; Wei et al., Kojima et al.).
    #[default]
    LmEval,
    /// `Question: …\nAnswer:` turns (the bare question in chat), answers ending `#### N`,
    /// direct answers opening with `####`, reasoning modes with nothing: for models taught
    /// GSM8K's answer format.
    Gsm8k,
}

impl Style {
    /// The question's turn: the text before the answer (plain) or the user message (chat).
    fn question(self, question: &str, chat: bool) -> String {
        match (self, chat) {
            (Style::LmEval, false) => format!("Q: {question}\nA:"),
            (Style::LmEval, true) => format!("Q: {question}"),
            (Style::Gsm8k, false) => format!("Question: {question}\nAnswer:"),
            (Style::Gsm8k, true) => question.to_string(),
        }
    }

    /// Where a plain-text generation ends: at the next question's turn.
    pub fn default_stop(self) -> &'static str {
        match self {
            Style::LmEval => "Q:",
            Style::Gsm8k => "Question:",
        }
    }
}

/// Kojima et al.'s second, answer-extraction pass of zero-shot CoT.
pub const ANSWER_PASS: &str = "Therefore, the answer (arabic numerals) is";

/// A worked example shown before the question.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    pub question: String,
    /// The reasoning, without the final "The answer is N."
    pub rationale: String,
    /// The final answer as written.
    pub answer: String,
}

impl Exemplar {
    /// The exemplar's answer turn: reasoning then "The answer is N." (or `#### N`), or
    /// the latter alone.
    pub fn answer_text(&self, with_reasoning: bool, style: Style) -> String {
        let answer = match style {
            Style::LmEval => format!("The answer is {}.", self.answer),
            Style::Gsm8k => format!("#### {}", self.answer),
        };
        match (with_reasoning, style) {
            (false, _) => answer,
            (true, Style::LmEval) => format!("{} {answer}", self.rationale),
            (true, Style::Gsm8k) => format!("{}\n{answer}", self.rationale),
        }
    }
}

/// The eight exemplars of Wei et al. (2022), Table 20, as `gsm8k-cot` shows them.
pub fn wei_exemplars() -> Vec<Exemplar> {
    const WEI: [(&str, &str, &str); 8] = [
        (
            "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
            "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6.",
            "6",
        ),
        (
            "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
            "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
            "5",
        ),
        (
            "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
            "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39.",
            "39",
        ),
        (
            "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
            "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
            "8",
        ),
        (
            "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
            "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.",
            "9",
        ),
        (
            "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
            "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29.",
            "29",
        ),
        (
            "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
            "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls.",
            "33",
        ),
        (
            "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
            "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8.",
            "8",
        ),
    ];
    WEI.iter()
        .map(|(q, r, a)| Exemplar { question: q.to_string(), rationale: r.to_string(), answer: a.to_string() })
        .collect()
}

/// `k` exemplars drawn without replacement from `pool` (a train file's problems) with
/// `seed`; the reasoning is the solution with its calculator annotations and `#### N`
/// line removed, its lines joined by spaces (a blank line would end a turn).
pub fn drawn_exemplars(pool: &[Problem], k: usize, seed: u64) -> Vec<Exemplar> {
    let mut rng = seeded_rng(seed);
    let mut picked = sample(&mut rng, pool.len(), k.min(pool.len())).into_vec();
    picked.sort_unstable();
    picked
        .into_iter()
        .map(|i| {
            let p = &pool[i];
            let rationale =
                p.rationale().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
            Exemplar { question: p.question.clone(), rationale, answer: p.target.clone() }
        })
        .collect()
}

/// A prompt as text, and the opening of the answer it ends with.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub opening: &'static str,
}

/// The prompt of `question` in `mode` and `style`: plain text, or through `chat`'s template.
pub fn build(
    mode: Mode,
    style: Style,
    question: &str,
    exemplars: &[Exemplar],
    chat: Option<&Tokenizer>,
) -> Result<Prompt> {
    let shown: &[Exemplar] = if mode.uses_exemplars() { exemplars } else { &[] };
    let with_reasoning = matches!(mode, Mode::FewShotCot | Mode::SelfConsistency);
    let opening = mode.answer_opening(style);
    let text = match chat {
        None => {
            let mut text = String::new();
            for e in shown {
                let answer = e.answer_text(with_reasoning, style);
                text.push_str(&format!("{} {answer}\n\n", style.question(&e.question, false)));
            }
            text.push_str(&style.question(question, false));
            if !opening.is_empty() {
                text.push(' ');
                text.push_str(opening);
            }
            text
        }
        Some(tokenizer) => {
            let mut messages = Vec::new();
            for e in shown {
                messages.push(ChatMessage::new("user", style.question(&e.question, true)));
                messages.push(ChatMessage::new("assistant", e.answer_text(with_reasoning, style)));
            }
            messages.push(ChatMessage::new("user", style.question(question, true)));
            let mut text = tokenizer.apply_chat_template(&messages, true)?;
            text.push_str(opening);
            text
        }
    };
    Ok(Prompt { text, opening })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_prompts_of_each_mode() {
        let ex = &wei_exemplars()[..2];
        let q = "What is 2 + 3?";
        let text = |m| build(m, Style::LmEval, q, ex, None).unwrap().text;
        assert_eq!(text(Mode::Direct), "Q: What is 2 + 3?\nA: The answer is");
        assert_eq!(text(Mode::ZeroShotCot), "Q: What is 2 + 3?\nA: Let's think step by step.");
        assert_eq!(
            text(Mode::FewShotCot),
            "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?\n\
             A: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.\n\n\
             Q: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n\
             A: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n\
             Q: What is 2 + 3?\nA:"
        );
        assert!(text(Mode::FewShotDirect).contains("A: The answer is 5.\n\nQ: What is 2 + 3?\nA: The answer is"));
        assert_eq!(text(Mode::SelfConsistency), text(Mode::FewShotCot));
    }

    /// Chat rendering: each exemplar a user turn and an assistant turn, the question a
    /// user turn, the generation prompt, then the mode's opening (Qwen2.5's template).
    #[test]
    fn chat_prompts_go_through_the_models_template() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../core/tests/fixtures/tokenizers/qwen2.5");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let ex = &wei_exemplars()[..1];
        let direct = build(Mode::Direct, Style::LmEval, "What is 2 + 3?", ex, Some(&tokenizer)).unwrap().text;
        assert!(direct.starts_with("<|im_start|>system\n"), "{direct}");
        assert!(
            direct.ends_with("<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n<|im_start|>assistant\nThe answer is"),
            "{direct}"
        );
        assert!(!direct.contains("grove"), "direct shows no exemplars: {direct}");
        let few = build(Mode::FewShotCot, Style::LmEval, "What is 2 + 3?", ex, Some(&tokenizer)).unwrap().text;
        assert!(
            few.contains("<|im_start|>user\nQ: There are 15 trees in the grove.")
                && few.contains("<|im_start|>assistant\nThere are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.<|im_end|>"),
            "{few}"
        );
        assert!(few.ends_with("<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"), "{few}");
    }

    /// GSM8K's own format: `Question:`/`Answer:` turns, `#### N` answers, `direct`
    /// opening with `####` and the reasoning modes with nothing.
    #[test]
    fn gsm8k_style_prompts() {
        let ex = [Exemplar { question: "What is 1 + 1?".into(), rationale: "1 + 1 = 2.".into(), answer: "2".into() }];
        let text = |m| build(m, Style::Gsm8k, "What is 2 + 3?", &ex, None).unwrap();
        assert_eq!(text(Mode::Direct).text, "Question: What is 2 + 3?\nAnswer: ####");
        assert_eq!(text(Mode::Direct).opening, "####");
        assert_eq!(text(Mode::ZeroShotCot).text, "Question: What is 2 + 3?\nAnswer:");
        assert_eq!(
            text(Mode::FewShotCot).text,
            "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2.\n#### 2\n\nQuestion: What is 2 + 3?\nAnswer:"
        );
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../core/tests/fixtures/tokenizers/qwen2.5");
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let chat = build(Mode::SelfConsistency, Style::Gsm8k, "What is 2 + 3?", &ex, Some(&tokenizer)).unwrap().text;
        assert!(
            chat.contains(
                "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n1 + 1 = 2.\n#### 2<|im_end|>"
            ) && chat.ends_with("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"),
            "{chat}"
        );
    }

    #[test]
    fn wei_exemplars_are_consistent() {
        let ex = wei_exemplars();
        assert_eq!(ex.len(), 8);
        assert_eq!(
            ex.iter().map(|e| e.answer.as_str()).collect::<Vec<_>>(),
            ["6", "5", "39", "8", "9", "29", "33", "8"]
        );
    }

    #[test]
    fn drawn_exemplars_are_seeded_and_clean() {
        let pool: Vec<Problem> = (0..20)
            .map(|i| Problem {
                question: format!("q{i}"),
                solution: format!("a = <<{i}+1={}>>{}\nso\n#### {}", i + 1, i + 1, i + 1),
                target: (i + 1).to_string(),
            })
            .collect();
        let a = drawn_exemplars(&pool, 3, 7);
        assert_eq!(a, drawn_exemplars(&pool, 3, 7));
        assert_ne!(a, drawn_exemplars(&pool, 3, 8));
        let e = &a[0];
        let i: usize = e.question[1..].parse().unwrap();
        assert_eq!(e.rationale, format!("a = {} so", i + 1));
        assert_eq!(e.answer_text(true, Style::LmEval), format!("a = {} so The answer is {}.", i + 1, i + 1));
        assert_eq!(e.answer_text(true, Style::Gsm8k), format!("a = {} so\n#### {}", i + 1, i + 1));
    }
}

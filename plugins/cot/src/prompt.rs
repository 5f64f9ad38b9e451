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
    pub fn answer_opening(self) -> &'static str {
        match self {
            Mode::Direct | Mode::FewShotDirect => "The answer is",
            Mode::ZeroShotCot => "Let's think step by step.",
            Mode::FewShotCot | Mode::SelfConsistency => "",
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
    /// The exemplar's answer turn: reasoning then "The answer is N.", or the latter alone.
    pub fn answer_text(&self, with_reasoning: bool) -> String {
        if with_reasoning {
            format!("{} The answer is {}.", self.rationale, self.answer)
        } else {
            format!("The answer is {}.", self.answer)
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

/// The prompt of `question` in `mode`: plain text, or through `chat`'s template.
pub fn build(mode: Mode, question: &str, exemplars: &[Exemplar], chat: Option<&Tokenizer>) -> Result<Prompt> {
    let shown: &[Exemplar] = if mode.uses_exemplars() { exemplars } else { &[] };
    let with_reasoning = matches!(mode, Mode::FewShotCot | Mode::SelfConsistency);
    let opening = mode.answer_opening();
    let text = match chat {
        None => {
            let mut text = String::new();
            for e in shown {
                text.push_str(&format!("Q: {}\nA: {}\n\n", e.question, e.answer_text(with_reasoning)));
            }
            text.push_str(&format!("Q: {question}\nA:"));
            if !opening.is_empty() {
                text.push(' ');
                text.push_str(opening);
            }
            text
        }
        Some(tokenizer) => {
            let mut messages = Vec::new();
            for e in shown {
                messages.push(ChatMessage::new("user", format!("Q: {}", e.question)));
                messages.push(ChatMessage::new("assistant", e.answer_text(with_reasoning)));
            }
            messages.push(ChatMessage::new("user", format!("Q: {question}")));
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
        let text = |m| build(m, q, ex, None).unwrap().text;
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
        let direct = build(Mode::Direct, "What is 2 + 3?", ex, Some(&tokenizer)).unwrap().text;
        assert!(direct.starts_with("<|im_start|>system\n"), "{direct}");
        assert!(
            direct.ends_with("<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n<|im_start|>assistant\nThe answer is"),
            "{direct}"
        );
        assert!(!direct.contains("grove"), "direct shows no exemplars: {direct}");
        let few = build(Mode::FewShotCot, "What is 2 + 3?", ex, Some(&tokenizer)).unwrap().text;
        assert!(
            few.contains("<|im_start|>user\nQ: There are 15 trees in the grove.")
                && few.contains("<|im_start|>assistant\nThere are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.<|im_end|>"),
            "{few}"
        );
        assert!(few.ends_with("<|im_start|>user\nQ: What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"), "{few}");
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
        assert_eq!(e.answer_text(true), format!("a = {} so The answer is {}.", i + 1, i + 1));
    }
}

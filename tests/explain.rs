//! `plumb explain`: every option of every shipped stage, evaluator and reward, with its
//! type, default and doc; and `plumb validate`, which prints the recipe with those
//! defaults filled in.
mod common;

use common::*;

/// The `<plugin>.<name>` of every stage, evaluator and reward `plumb plugins` lists for
/// the plugins shipped under `plugins/` (not the test fixtures beside them).
fn shipped_components() -> Vec<String> {
    let shipped: Vec<String> = std::fs::read_dir(repo_root().join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let listed = stdout(&plumb(&repo_root(), &["plugins"]));
    let mut names = Vec::new();
    for line in listed.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [kind, name, ..] = words[..] {
            let plugin = name.split('.').next().unwrap();
            if ["stage", "evaluator", "reward"].contains(&kind) && shipped.iter().any(|s| s == plugin) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// The option lines of `plumb explain`'s output (`key: type ...`) with the doc line after each.
fn option_lines(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let is_option = |l: &str| {
        l.split_once(": ").is_some_and(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
    };
    (0..lines.len())
        .filter(|&i| is_option(lines[i]))
        .map(|i| (lines[i].to_owned(), lines.get(i + 1).copied().unwrap_or("").to_owned()))
        .collect()
}

#[test]
fn every_option_of_every_shipped_component_has_a_type_a_default_and_a_doc() {
    let names = shipped_components();
    for expected in ["pretrain.causal_lm", "pretrain.perplexity", "sft.sft", "rlhf.ppo", "rlhf.length", "cot.gsm8k"] {
        assert!(names.iter().any(|n| n == expected), "{expected} not among {names:?}");
    }
    let mut problems = Vec::new();
    for name in &names {
        let out = plumb(&repo_root(), &["explain", name]);
        assert_exit(&out, 0);
        let text = stdout(&out);
        let options = option_lines(&text);
        assert!(!options.is_empty() || text.contains("It has no options."), "{name}: {text}");
        for (line, doc) in options {
            let section = line.split_once(": ").is_some_and(|(_, rest)| rest.starts_with("mapping"));
            let typed = line.split_once(": ").is_some_and(|(_, rest)| !rest.trim().is_empty());
            let defaulted = line.contains(" = ") || line.ends_with("(required)") || section;
            if !typed || !defaulted {
                problems.push(format!("{name}: `{line}` has no type or no default"));
            }
            if !doc.starts_with("    ") || doc.trim().is_empty() || doc.contains("(no description)") {
                problems.push(format!("{name}: `{line}` has no doc"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn explain_shows_the_defaults_a_stage_declares() {
    let text = stdout(&plumb(&repo_root(), &["explain", "sft.sft"]));
    for line in [
        "optimizer.lr: number = 0.001",
        "optimizer.betas: [number, number] = [0.9, 0.95]",
        "batch_size: integer = 16",
        "max_length: integer = 512",
        "data.train: string (required)",
        "schedule.decay: `cosine` | `linear` | `constant` = cosine",
    ] {
        assert!(text.lines().any(|l| l == line), "`{line}` missing from:\n{text}");
    }
    let text = stdout(&plumb(&repo_root(), &["explain", "rlhf.ppo"]));
    for line in
        ["kl_coef: number = 0.05", "cliprange: number = 0.2", "reward: string | list of {name, weight} (required)"]
    {
        assert!(text.lines().any(|l| l == line), "`{line}` missing from:\n{text}");
    }
}

#[test]
fn explain_without_a_name_shows_the_run_section_and_what_else_it_can_explain() {
    for args in [&["explain"][..], &["explain", "run"]] {
        let out = plumb(&repo_root(), args);
        assert_exit(&out, 0);
        let text = stdout(&out);
        for line in ["output_dir: string (required)", "seed: integer = 0", "device: string = auto"] {
            assert!(text.lines().any(|l| l == line), "`{line}` missing from:\n{text}");
        }
        assert_eq!(text.contains("`plumb explain NAME` for the options of one of: "), args.len() == 1, "{text}");
    }
}

#[test]
fn an_unknown_name_is_an_error_listing_the_known_ones_with_the_nearest() {
    let out = plumb(&repo_root(), &["explain", "sft.sfft"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("no stage, evaluator or reward named `sft.sfft`; did you mean `sft.sft`?"), "{err}");
    assert!(err.contains("known: ") && err.contains("rlhf.ppo") && err.contains("pretrain.causal_lm"), "{err}");
}

#[test]
fn validate_prints_the_defaults_the_recipe_leaves_out_and_its_output_validates_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let out = plumb(&repo_root(), &["validate", "recipes/sft.yaml"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    let recipe = std::fs::read_to_string(repo_root().join("recipes/sft.yaml")).unwrap();
    // Keys recipes/sft.yaml does not set, with the defaults `plumb explain sft.sft` lists.
    for (key, value) in
        [("on_nonfinite", "stop"), ("grad_clip", "1.0"), ("log_every", "10"), ("max_line_bytes", "1048576")]
    {
        assert!(!recipe.contains(key), "recipes/sft.yaml sets `{key}`; pick another key");
        assert!(text.lines().any(|l| l.trim() == format!("{key}: {value}")), "`{key}` not filled in:\n{text}");
    }
    // The printed recipe is a recipe: it validates, and to the same text but its header.
    let resolved = dir.path().join("resolved.yaml");
    std::fs::write(&resolved, &text).unwrap();
    let again = plumb(&repo_root(), &["validate", resolved.to_str().unwrap()]);
    assert_exit(&again, 0);
    let body = |t: &str| t.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&stdout(&again)), body(&text));
}

/// Every shipped recipe's resolved form, defaults and all, is a recipe that validates.
#[test]
fn every_shipped_recipe_resolves_to_a_recipe_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let mut recipes: Vec<_> = std::fs::read_dir(repo_root().join("recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    recipes.sort();
    let mut checked = Vec::new();
    for recipe in recipes {
        let out = plumb(&repo_root(), &["validate", recipe.to_str().unwrap()]);
        if out.status.code() != Some(0) {
            // It needs a model or an example plugin from elsewhere (its own tests have them).
            continue;
        }
        let resolved = dir.path().join(recipe.file_name().unwrap());
        std::fs::write(&resolved, stdout(&out)).unwrap();
        let again = plumb(&repo_root(), &["validate", resolved.to_str().unwrap()]);
        assert_exit(&again, 0);
        checked.push(recipe.file_stem().unwrap().to_string_lossy().into_owned());
    }
    for needed in
        ["quickstart", "masked_lm", "span_corruption", "sft", "reward_model", "ppo", "cot_arith", "scaling_sweep"]
    {
        assert!(checked.iter().any(|c| c == needed), "recipes/{needed}.yaml did not validate; checked {checked:?}");
    }
}

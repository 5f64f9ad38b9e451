//! A weighted set of the recipe's rewards, as a stage's config names them and scores with
//! them: `reward: exact`, or `reward: [{name: rm, weight: 1.0}, {name: fmt, weight: 0.2}]`.
//!
//! The total of a pair is `Σ_k weight_k · score_k`; each part's unweighted scores come
//! back too ([`Scored::parts`]), so the stage logs every reward under its own tag.
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::ScorePair;
use crate::context::RunContext;
use crate::error::{Error, Result};
use crate::plugin::ValidateContext;

/// The rewards a stage scores with and their weights, in the config's order.
///
/// YAML: a single reward name (`reward: exact`, weight 1), or a list
/// `[{name: rm, weight: 1.0}, {name: fmt, weight: 0.2}]` (weight default 1.0). An empty
/// list is an error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardWeights(pub Vec<WeightedReward>);

/// One reward of a [`RewardWeights`]: a name from the recipe's `rewards:`, and its weight.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedReward {
    /// A name from the recipe's `rewards:`.
    pub name: String,
    /// What its scores are multiplied by in the total.
    #[serde(default = "one")]
    pub weight: f64,
}

/// A reward's name, or a list of `{name, weight}`.
impl schemars::JsonSchema for RewardWeights {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RewardWeights".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let list = generator.subschema_for::<Vec<WeightedReward>>();
        schemars::json_schema!({ "anyOf": [{ "type": "string" }, list] })
    }
}

fn one() -> f64 {
    1.0
}

impl<'de> Deserialize<'de> for RewardWeights {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either;

        impl<'de> Visitor<'de> for Either {
            type Value = RewardWeights;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a reward name, or a list of {name, weight}")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<RewardWeights, E> {
                Ok(RewardWeights(vec![WeightedReward { name: name.to_owned(), weight: 1.0 }]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RewardWeights, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element::<WeightedReward>()? {
                    parts.push(part);
                }
                if parts.is_empty() {
                    return Err(de::Error::invalid_length(0, &"at least one reward"));
                }
                Ok(RewardWeights(parts))
            }
        }

        deserializer.deserialize_any(Either)
    }
}

impl RewardWeights {
    /// One reward, weight 1.
    pub fn single(name: impl Into<String>) -> Self {
        Self(vec![WeightedReward { name: name.into(), weight: 1.0 }])
    }

    /// The names, in the config's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|w| w.name.as_str())
    }

    /// Checks, with errors at `key` (the config key holding this set, e.g. `reward`):
    /// every name is defined in the recipe's `rewards:`, weights are finite, no name twice.
    pub fn validate(&self, key: &str, ctx: &ValidateContext) -> Result<()> {
        if self.0.is_empty() {
            return Err(Error::config(key, "expected at least one reward"));
        }
        for (i, part) in self.0.iter().enumerate() {
            // A set written as a bare name has no `[0].name` to point at; a set of one
            // points at its key either way.
            let name_at = if self.0.len() == 1 { key.to_owned() } else { format!("{key}[{i}].name") };
            ctx.require_reward(&name_at, &part.name)?;
            if !part.weight.is_finite() {
                // Only the list form sets a weight.
                let at = format!("{key}[{i}].weight");
                return Err(Error::config(at, format!("expected a finite number, found {}", part.weight)));
            }
            if self.0[..i].iter().any(|earlier| earlier.name == part.name) {
                return Err(Error::config(
                    name_at,
                    format!("reward `{}` is listed twice; give it one entry with the sum of the weights", part.name),
                ));
            }
        }
        Ok(())
    }
}

/// Scores of one batch by a [`RewardSet`].
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Per pair, `Σ_k weight_k · score_k`.
    pub total: Vec<f64>,
    /// (reward name, its unweighted scores) in the config's order.
    pub parts: Vec<(String, Vec<f64>)>,
}

impl Scored {
    /// The mean of each part's scores, (reward name, mean), in the config's order: what a
    /// stage logs per reward, e.g. under `objective/scores/<name>`.
    pub fn part_means(&self) -> Vec<(&str, f64)> {
        self.parts.iter().map(|(name, scores)| (name.as_str(), mean(scores))).collect()
    }

    /// The mean of the weighted totals.
    pub fn total_mean(&self) -> f64 {
        mean(&self.total)
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// A stage's weighted rewards, scored through the host.
///
/// The parts of a set are scored concurrently, one scoped thread per part, because each
/// part is one blocking C call into the host (which may hand it to another plugin); a
/// tokio runtime would only wrap those same blocking calls in `spawn_blocking`, at the
/// price of `'static` copies of the pairs. What overlaps *inside* a part (a remote
/// scorer's requests) is that reward's business, on its own runtime in its own plugin.
pub struct RewardSet<'c, 'h> {
    ctx: &'c RunContext<'h>,
    weights: RewardWeights,
}

impl<'c, 'h> RewardSet<'c, 'h> {
    /// The rewards `weights` names, reached through `ctx`'s host. Names are checked by
    /// [`RewardWeights::validate`] in the stage's `validate`; an undefined one fails here
    /// only at the first [`score`](Self::score).
    pub fn new(ctx: &'c RunContext<'h>, weights: &RewardWeights) -> Self {
        Self { ctx, weights: weights.clone() }
    }

    pub fn weights(&self) -> &RewardWeights {
        &self.weights
    }

    /// Scores `pairs` with every reward of the set at once. A failing reward names itself
    /// ("reward `rm`: ..."); the first failure in the config's order is returned. Scores
    /// are finite: the plugin side refuses a NaN or an infinity from a reward, which would
    /// poison an advantage estimate without a word.
    pub fn score(&mut self, pairs: &[ScorePair]) -> Result<Scored> {
        let request =
            serde_json::to_string(pairs).map_err(|e| Error::Other(format!("cannot encode the pairs: {e}")))?;
        let service = self.ctx.score_service();
        let one = |name: &str| service.score_json(name, &request, pairs.len());
        let results: Vec<Result<Vec<f64>>> = if self.weights.0.len() == 1 {
            vec![one(&self.weights.0[0].name)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = self.weights.names().map(|name| scope.spawn(move || one(name))).collect();
                handles
                    .into_iter()
                    .zip(self.weights.names())
                    .map(|(h, name)| {
                        h.join().unwrap_or_else(|_| {
                            Err(Error::Other(format!("reward `{name}`: its scoring thread panicked")))
                        })
                    })
                    .collect()
            })
        };
        let mut total = vec![0.0; pairs.len()];
        let mut parts = Vec::with_capacity(results.len());
        for (part, scores) in self.weights.0.iter().zip(results) {
            let scores = scores?;
            for (t, s) in total.iter_mut().zip(&scores) {
                *t += part.weight * s;
            }
            parts.push((part.name.clone(), scores));
        }
        Ok(Scored { total, parts })
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::context::RunRequest;
    use crate::plugin::abi::{ByteSink, HostApi, ProgressUpdate, Status, StrRef, ABI_VERSION};
    use crate::recipe::parse_section;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        reward: RewardWeights,
    }

    fn parse(yaml: &str) -> crate::Result<RewardWeights> {
        parse_section::<Section>(yaml).map(|s| s.reward).map_err(Error::Config)
    }

    fn ctx(names: &[&str]) -> ValidateContext {
        ValidateContext::new(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_single_name_and_a_weighted_list_both_parse() {
        assert_eq!(parse("reward: exact").unwrap(), RewardWeights::single("exact"));
        let list = parse("reward: [{name: rm, weight: 1.0}, {name: fmt, weight: 0.2}, {name: len}]").unwrap();
        let expected = [("rm", 1.0), ("fmt", 0.2), ("len", 1.0)];
        assert_eq!(list.0.len(), 3);
        for (part, (name, weight)) in list.0.iter().zip(expected) {
            assert_eq!((part.name.as_str(), part.weight), (name, weight));
        }
        // It round-trips as the list form.
        let yaml = serde_yaml::to_string(&list).unwrap();
        assert_eq!(serde_yaml::from_str::<RewardWeights>(&yaml).unwrap(), list);
    }

    #[test]
    fn malformed_sets_are_errors_at_their_key() {
        let e = parse("reward: []").unwrap_err().to_string();
        assert!(e.contains("reward") && e.contains("at least one reward"), "{e}");
        let e = parse("reward: [{name: rm, weigth: 2}]").unwrap_err().to_string();
        assert!(e.starts_with("reward[0].weigth") && e.contains("unknown"), "{e}");
        let e = parse("reward: [{weight: 2}]").unwrap_err().to_string();
        assert!(e.starts_with("reward[0]") && e.contains("name"), "{e}");
        let e = parse("reward: 3").unwrap_err().to_string();
        assert!(e.starts_with("reward") && e.contains("a reward name, or a list of {name, weight}"), "{e}");
    }

    #[test]
    fn validate_checks_names_weights_and_duplicates() {
        let c = ctx(&["rm", "fmt"]);
        assert!(parse("reward: rm").unwrap().validate("reward", &c).is_ok());
        assert!(parse("reward: [{name: rm}, {name: fmt, weight: -0.5}]").unwrap().validate("reward", &c).is_ok());

        let e = parse("reward: exact").unwrap().validate("reward", &c).unwrap_err().to_string();
        assert_eq!(e, "reward: reward `exact` is not defined in the recipe's `rewards:` (defined: rm, fmt)");
        let e = parse("reward: [{name: rm}, {name: ftm}]").unwrap().validate("reward", &c).unwrap_err().to_string();
        assert_eq!(
            e,
            "reward[1].name: reward `ftm` is not defined in the recipe's `rewards:` (defined: rm, fmt); did you mean `fmt`?"
        );
        let e = parse("reward: rm").unwrap().validate("reward", &ctx(&[])).unwrap_err().to_string();
        assert!(e.contains("(defined: none; add one under `rewards:`)"), "{e}");
        let e = parse("reward: [{name: rm, weight: .nan}]").unwrap().validate("reward", &c).unwrap_err().to_string();
        assert_eq!(e, "reward[0].weight: expected a finite number, found NaN");
        let e = parse("reward: [{name: rm}, {name: rm, weight: 2}]").unwrap().validate("reward", &c).unwrap_err();
        assert!(e.to_string().starts_with("reward[1].name: reward `rm` is listed twice"), "{e}");
    }

    // A host whose rewards are: `len` (characters of the response), `words` (its words),
    // `broken` (fails). `len` and `words` each wait, up to 5 s, until the
    // other is in flight too: a set that scored them one after the other would see them
    // time out and fail.
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    static MOST_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn score(_: *mut c_void, reward: StrRef, request: StrRef, out: ByteSink) -> i32 {
        let name = unsafe { reward.to_string_lossy() };
        let pairs: Vec<ScorePair> = serde_json::from_slice(unsafe { request.as_bytes() }).unwrap();
        let scores: Vec<f64> = match name.as_str() {
            "len" | "words" => {
                let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
                MOST_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(5);
                while MOST_IN_FLIGHT.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                if name == "len" {
                    pairs.iter().map(|p| p.response.len() as f64).collect()
                } else {
                    pairs.iter().map(|p| p.response.split_whitespace().count() as f64).collect()
                }
            }
            _ => {
                out.send(b"the scorer is down");
                return Status::Failed as i32;
            }
        };
        out.send(serde_json::to_string(&scores).unwrap().as_bytes());
        Status::Ok as i32
    }
    extern "C" fn scalar(_: *mut c_void, _: StrRef, _: i64, _: f64) {}
    extern "C" fn text(_: *mut c_void, _: StrRef, _: i64, _: StrRef) {}
    extern "C" fn hparams(_: *mut c_void, _: StrRef) {}
    extern "C" fn progress(_: *mut c_void, _: *const ProgressUpdate) {}
    extern "C" fn log(_: *mut c_void, _: u32, _: StrRef) {}
    extern "C" fn should_stop(_: *mut c_void) -> u8 {
        0
    }
    extern "C" fn restart_at(_: *mut c_void, _: i64) {}

    fn host() -> HostApi {
        HostApi {
            abi_version: ABI_VERSION,
            state: std::ptr::null_mut(),
            log_scalar: scalar,
            log_text: text,
            log_hparams: hparams,
            progress,
            log,
            should_stop,
            score,
            restart_at,
        }
    }

    fn context(host: &HostApi) -> RunContext<'_> {
        let request = RunRequest {
            stage: "ppo".into(),
            config_yaml: String::new(),
            run_dir: "/nonexistent".into(),
            stage_dir: "/nonexistent/ppo".into(),
            input_model: None,
            device: "cpu".into(),
            seed: 0,
            resume: false,
            rewards: vec!["len".into(), "words".into()],
            dist: None,
        };
        // SAFETY: the host's functions ignore their state and outlive the context.
        unsafe { RunContext::new(host, request) }.unwrap()
    }

    #[test]
    fn parts_are_scored_concurrently_and_summed_with_their_weights() {
        let host = host();
        let ctx = context(&host);
        let weights = parse("reward: [{name: len, weight: 0.5}, {name: words, weight: -2}]").unwrap();
        let pairs = [ScorePair::new("q", "one two"), ScorePair::new("q", "three").with_reference("3")];
        let scored = RewardSet::new(&ctx, &weights).score(&pairs).unwrap();
        assert_eq!(MOST_IN_FLIGHT.load(Ordering::SeqCst), 2, "the two parts were not in flight together");
        assert_eq!(scored.parts, vec![("len".to_string(), vec![7.0, 5.0]), ("words".to_string(), vec![2.0, 1.0])]);
        // 0.5·7 − 2·2 = −0.5; 0.5·5 − 2·1 = 0.5
        assert_eq!(scored.total, vec![-0.5, 0.5]);
        assert_eq!(scored.part_means(), vec![("len", 6.0), ("words", 1.5)]);
        assert_eq!(scored.total_mean(), 0.0);
    }

    #[test]
    fn a_failing_reward_names_itself() {
        let host = host();
        let ctx = context(&host);
        let pairs = [ScorePair::new("q", "a")];
        let e = RewardSet::new(&ctx, &RewardWeights::single("broken")).score(&pairs).unwrap_err();
        assert_eq!(e.to_string(), "reward `broken`: the scorer is down");
    }
}

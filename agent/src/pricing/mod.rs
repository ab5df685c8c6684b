//! What a call cost: a price table (USD per million tokens, per model) and
//! the arithmetic from a call's usage to dollars.
//!
//! The shipped table (`default.yaml`, embedded) covers the common models of
//! the built-in providers; `pricing.models` in the config adds or overrides
//! entries. A model is priced by the *most specific* matching entry (the most
//! literal characters in its glob), so `gpt-4o-mini*` wins over `gpt-4o*`
//! whatever the order; on a tie, a config entry wins over a shipped one.
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::providers::Usage;

/// One price-table entry, as written in YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    /// Glob on the model name (`gpt-4o-mini*`, `my-finetune`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Only for calls to this provider (a `providers[].name`); any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// USD per million input tokens not served from or written to a cache.
    pub input: f64,
    /// USD per million input tokens read from the prompt cache (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
    /// USD per million input tokens written to the prompt cache (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_input: Option<f64>,
    /// USD per million output tokens (reasoning tokens included).
    pub output: f64,
    /// USD per million audio input tokens not read from a cache (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_input: Option<f64>,
    /// USD per million image input tokens not read from a cache (default: `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_input: Option<f64>,
    /// USD per million audio output tokens (default: `output`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_output: Option<f64>,
}

/// The `pricing` section of the agent config.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// Include Tollgate's shipped table (README: "Prices").
    pub defaults: bool,
    /// Entries added to (and winning ties over) the shipped table.
    pub models: Vec<PriceEntry>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        Self {
            defaults: true,
            models: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PricingError {
    #[error("`{pattern}` is not a valid glob: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("`{field}` of `{pattern}` must be a finite price >= 0 (USD per million tokens)")]
    BadPrice {
        pattern: String,
        field: &'static str,
    },
}

struct Entry {
    matcher: GlobMatcher,
    provider: Option<String>,
    /// Literal (non-wildcard) characters: higher is more specific.
    specificity: usize,
    /// Config entries rank above shipped ones on equal specificity.
    from_config: bool,
    price: PriceEntry,
}

/// A compiled price table.
pub struct PriceTable {
    entries: Vec<Entry>,
    /// (provider, model) → entry index: globs are matched once per model,
    /// not per call. Bounded: cleared when full (model names come from
    /// workloads, so their number is not ours to trust).
    cache: std::sync::Mutex<std::collections::HashMap<(String, String), Option<usize>>>,
}

const CACHE_CAP: usize = 4096;

/// The shipped table's source.
pub const DEFAULT_TABLE: &str = include_str!("default.yaml");

/// When the shipped prices were taken from the providers' price lists.
pub const SHIPPED_AS_OF: &str = "November 2025";

impl PriceTable {
    pub fn new(cfg: &PricingConfig) -> Result<Self, (usize, PricingError)> {
        let mut entries = Vec::new();
        for (i, e) in cfg.models.iter().enumerate() {
            entries.push(compile(e, true).map_err(|err| (i, err))?);
        }
        if cfg.defaults {
            for e in shipped() {
                entries.push(compile(&e, false).expect("the shipped price table is valid"));
            }
        }
        Ok(Self {
            entries,
            cache: Default::default(),
        })
    }

    /// Price of a call to `provider` answered by `model`, or None when no
    /// entry matches (the audit record then has no `cost_usd`).
    pub fn price(&self, provider: &str, model: &str) -> Option<&PriceEntry> {
        self.lookup(provider, model).map(|i| &self.entries[i].price)
    }

    /// The pattern of the entry that prices `model` (e.g. `gpt-4o-mini*`):
    /// a name for the model family that the table, not the workload,
    /// bounds. The metrics label a model no provider confirmed with it.
    pub fn family(&self, provider: &str, model: &str) -> Option<&str> {
        self.lookup(provider, model)
            .map(|i| self.entries[i].matcher.glob().glob())
    }

    fn lookup(&self, provider: &str, model: &str) -> Option<usize> {
        let key = (provider.to_string(), model.to_string());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hit) = cache.get(&key) {
            return *hit;
        }
        let found = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.provider.as_deref().is_none_or(|p| p == provider))
            .filter(|(_, e)| e.matcher.is_match(model))
            .max_by_key(|(_, e)| (e.specificity, e.from_config))
            .map(|(i, _)| i);
        if cache.len() >= CACHE_CAP {
            cache.clear();
        }
        cache.insert(key, found);
        found
    }

    /// The table as `tollgate pricing` prints it: one line per entry, in
    /// the order they were given (config entries first).
    pub fn listing(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "shipped prices as of {SHIPPED_AS_OF}, USD per million tokens (override under pricing.models)\n\n{:<28} {:<10} {:>9} {:>9} {:>9} {:>9}  {:<8} other modalities\n",
            "match", "provider", "input", "cached", "cache w.", "output", "source"
        );
        for e in &self.entries {
            let p = &e.price;
            let line = format!(
                "{:<28} {:<10} {:>9} {:>9} {:>9} {:>9}  {:<8} {}",
                p.pattern,
                p.provider.as_deref().unwrap_or("any"),
                p.input,
                p.cached_input.unwrap_or(p.input),
                p.cache_write_input.unwrap_or(p.input),
                p.output,
                if e.from_config { "config" } else { "shipped" },
                modalities(p).unwrap_or_default()
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }

    /// Which entry prices `model` of `provider`, and at what; or what to
    /// add when none does.
    pub fn explain(&self, provider: &str, model: &str) -> String {
        match self.lookup(provider, model) {
            Some(i) => {
                let e = &self.entries[i];
                let p = &e.price;
                format!(
                    "{model} ({provider}): priced by `{}` ({}): input {}, cached input {}, cache writes {}, output {}{} USD per million tokens\n",
                    p.pattern,
                    if e.from_config { "config" } else { "shipped" },
                    p.input,
                    p.cached_input.unwrap_or(p.input),
                    p.cache_write_input.unwrap_or(p.input),
                    p.output,
                    modalities(p).map(|m| format!(", {m}")).unwrap_or_default()
                )
            }
            None => format!(
                "{model} ({provider}): no entry prices it; its calls have no cost_usd and count nothing against budgets\nhint: add it under pricing.models, e.g.\n  pricing:\n    models:\n      - {{match: \"{model}*\", input: 1.0, output: 4.0}}\n"
            ),
        }
    }

    /// USD cost of `usage` for a call to `provider` answered by `model`.
    pub fn cost(&self, provider: &str, model: &str, usage: &Usage) -> Option<f64> {
        self.price(provider, model).map(|p| cost(p, usage))
    }
}

/// USD cost of `usage` at price `p`. Input read from or written to the
/// cache is priced at the cache's rates whatever its modality; of the rest,
/// audio and image tokens at their own rates (never more of them than the
/// rest holds), the remainder as text.
pub fn cost(p: &PriceEntry, u: &Usage) -> f64 {
    let cached = u.cached_input_tokens;
    let written = u.cache_write_input_tokens;
    let fresh = u
        .input_tokens
        .saturating_sub(cached)
        .saturating_sub(written);
    let audio_in = u.audio_input_tokens.min(fresh);
    let image_in = u.image_input_tokens.min(fresh - audio_in);
    let text_in = fresh - audio_in - image_in;
    let audio_out = u.audio_output_tokens.min(u.output_tokens);
    let per_token = |n: u64, usd_per_m: f64| n as f64 * usd_per_m / 1e6;
    per_token(text_in, p.input)
        + per_token(audio_in, p.audio_input.unwrap_or(p.input))
        + per_token(image_in, p.image_input.unwrap_or(p.input))
        + per_token(cached, p.cached_input.unwrap_or(p.input))
        + per_token(written, p.cache_write_input.unwrap_or(p.input))
        + per_token(u.output_tokens - audio_out, p.output)
        + per_token(audio_out, p.audio_output.unwrap_or(p.output))
}

/// The prices an entry sets for audio and images, as `tollgate pricing`
/// prints them (`audio input 32, audio output 64`); None when it sets none.
fn modalities(p: &PriceEntry) -> Option<String> {
    let set: Vec<String> = [
        ("audio input", p.audio_input),
        ("image input", p.image_input),
        ("audio output", p.audio_output),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.map(|v| format!("{name} {v}")))
    .collect();
    (!set.is_empty()).then(|| set.join(", "))
}

fn shipped() -> Vec<PriceEntry> {
    serde_yaml::from_str(DEFAULT_TABLE).expect("the shipped price table parses")
}

fn compile(e: &PriceEntry, from_config: bool) -> Result<Entry, PricingError> {
    let matcher = Glob::new(&e.pattern)
        .map_err(|err| PricingError::BadPattern {
            pattern: e.pattern.clone(),
            reason: err.kind().to_string(),
        })?
        .compile_matcher();
    for (field, v) in [
        ("input", Some(e.input)),
        ("cached_input", e.cached_input),
        ("cache_write_input", e.cache_write_input),
        ("output", Some(e.output)),
        ("audio_input", e.audio_input),
        ("image_input", e.image_input),
        ("audio_output", e.audio_output),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            return Err(PricingError::BadPrice {
                pattern: e.pattern.clone(),
                field,
            });
        }
    }
    Ok(Entry {
        matcher,
        provider: e.provider.clone(),
        specificity: e
            .pattern
            .chars()
            .filter(|c| !matches!(c, '*' | '?' | '[' | ']' | '{' | '}'))
            .count(),
        from_config,
        price: e.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(models: &str) -> PriceTable {
        PriceTable::new(&PricingConfig {
            defaults: true,
            models: serde_yaml::from_str(models).unwrap(),
        })
        .unwrap()
    }

    #[test]
    fn shipped_table_parses_and_prices_dated_snapshots() {
        let t = table("[]");
        let p = t.price("openai", "gpt-4o-mini-2024-07-18").unwrap();
        assert_eq!(p.pattern, "gpt-4o-mini*"); // not gpt-4o*
        assert_eq!(
            t.price("openai", "gpt-4o-2024-08-06").unwrap().pattern,
            "gpt-4o*"
        );
        assert_eq!(
            t.price("anthropic", "claude-sonnet-4-5-20250929")
                .unwrap()
                .pattern,
            "claude-sonnet-4*"
        );
        assert_eq!(
            t.price("gemini", "gemini-2.5-flash-lite").unwrap().pattern,
            "gemini-2.5-flash-lite*"
        );
        assert!(t.price("openai", "totally-unknown").is_none());
    }

    /// Every shipped entry prices its own models: the bare name and a dated
    /// snapshot of it fall under that entry, not under a shorter (cheaper
    /// or dearer) glob — `o3-pro` is not priced as `o3`.
    #[test]
    fn every_shipped_entry_is_the_most_specific_match_for_its_models() {
        let t = PriceTable::new(&PricingConfig::default()).unwrap();
        for e in shipped() {
            // Bedrock's entries start with `*` (a cross-region prefix).
            let stem = e.pattern.trim_matches('*');
            for model in [stem.to_string(), format!("{stem}-2099-01-01")] {
                assert_eq!(
                    t.family("openai", &model),
                    Some(e.pattern.as_str()),
                    "{model} is not priced by its own entry"
                );
            }
        }
        for (model, input, output) in [
            ("o3-pro-2025-06-10", 20.0, 80.0),
            ("gpt-5-pro", 15.0, 120.0),
            ("o1-pro", 150.0, 600.0),
            ("o3-2025-04-16", 2.0, 8.0),
            ("gpt-5.1", 1.25, 10.0),
            ("anthropic.claude-3-5-haiku-20241022-v1:0", 0.80, 4.0),
            ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", 3.0, 15.0),
            ("global.anthropic.claude-opus-4-5-20251101-v1:0", 5.0, 25.0),
            ("us.amazon.nova-pro-v1:0", 0.80, 3.20),
            ("meta.llama3-1-8b-instruct-v1:0", 0.22, 0.22),
            // Anthropic's own API names stay Anthropic's.
            ("claude-3-5-haiku-20241022", 0.80, 4.0),
        ] {
            let p = t.price("openai", model).expect(model);
            assert_eq!((p.input, p.output), (input, output), "{model}");
        }
    }

    #[test]
    fn the_table_explains_itself() {
        let t = table("- {match: \"my-ft*\", provider: openai, input: 1.0, output: 2.0}");
        let list = t.listing();
        assert!(list.contains(SHIPPED_AS_OF), "{list}");
        assert!(
            list.lines()
                .any(|l| l.starts_with("my-ft*") && l.ends_with("config")),
            "{list}"
        );
        assert!(
            list.lines()
                .any(|l| l.starts_with("o3-pro*") && l.ends_with("shipped")),
            "{list}"
        );
        assert!(
            list.lines().any(|l| l.starts_with("gpt-realtime* ")
                && l.ends_with("shipped  audio input 32, image input 5, audio output 64")),
            "{list}"
        );
        let e = t.explain("openai", "o3-pro-2025-06-10");
        assert!(
            e.contains("priced by `o3-pro*` (shipped)") && e.contains("output 80"),
            "{e}"
        );
        let e = t.explain("openai", "brand-new-model");
        assert!(
            e.contains("no entry prices it") && e.contains("pricing.models"),
            "{e}"
        );
    }

    #[test]
    fn cost_splits_fresh_cached_and_written_input() {
        let p = PriceEntry {
            pattern: "m".into(),
            provider: None,
            input: 3.0,
            cached_input: Some(0.3),
            cache_write_input: Some(3.75),
            output: 15.0,
            audio_input: None,
            image_input: None,
            audio_output: None,
        };
        let u = Usage {
            input_tokens: 1_000_000 + 2_000_000 + 4_000_000,
            cached_input_tokens: 2_000_000,
            cache_write_input_tokens: 4_000_000,
            output_tokens: 500_000,
            ..Default::default()
        };
        // 1M fresh × 3 + 2M cached × 0.3 + 4M written × 3.75 + 0.5M out × 15
        let c = cost(&p, &u);
        assert!((c - (3.0 + 0.6 + 15.0 + 7.5)).abs() < 1e-9, "{c}");
        // Absent cache prices fall back to the input price.
        let plain = PriceEntry {
            cached_input: None,
            cache_write_input: None,
            ..p
        };
        assert!((cost(&plain, &u) - (21.0 + 7.5)).abs() < 1e-9);
    }

    #[test]
    fn audio_and_images_are_priced_at_their_own_rates() {
        let p = PriceEntry {
            pattern: "gpt-realtime*".into(),
            provider: None,
            input: 4.0,
            cached_input: Some(0.4),
            cache_write_input: None,
            output: 16.0,
            audio_input: Some(32.0),
            image_input: Some(5.0),
            audio_output: Some(64.0),
        };
        let u = Usage {
            // 1M text + 2M audio + 1M image fresh, 1M cached (of either).
            input_tokens: 5_000_000,
            cached_input_tokens: 1_000_000,
            audio_input_tokens: 2_000_000,
            image_input_tokens: 1_000_000,
            // 1M text + 1M audio out.
            output_tokens: 2_000_000,
            audio_output_tokens: 1_000_000,
            ..Default::default()
        };
        let c = cost(&p, &u);
        assert!(
            (c - (4.0 + 64.0 + 5.0 + 0.4 + 16.0 + 64.0)).abs() < 1e-9,
            "{c}"
        );
        // Without modality prices, the same usage is all text.
        let text_only = PriceEntry {
            audio_input: None,
            image_input: None,
            audio_output: None,
            ..p.clone()
        };
        assert!((cost(&text_only, &u) - (4.0 * 4.0 + 0.4 + 16.0 * 2.0)).abs() < 1e-9);
        // A provider's modality counts beyond its totals are never priced twice.
        let absurd = Usage {
            input_tokens: 1_000_000,
            audio_input_tokens: 9_000_000,
            image_input_tokens: 9_000_000,
            output_tokens: 1_000_000,
            audio_output_tokens: 9_000_000,
            ..Default::default()
        };
        assert!((cost(&p, &absurd) - (32.0 + 64.0)).abs() < 1e-9);
        assert_eq!(
            modalities(&p).as_deref(),
            Some("audio input 32, image input 5, audio output 64")
        );
    }

    #[test]
    fn config_entries_win_ties_and_can_be_provider_scoped() {
        let t = table(
            r#"
- {match: "gpt-4o*", input: 1.0, output: 2.0}
- {match: "*", provider: azure, input: 9.0, output: 9.0}
"#,
        );
        assert_eq!(t.price("openai", "gpt-4o").unwrap().input, 1.0);
        // More specific shipped entry still wins over a broader config one.
        assert_eq!(t.price("openai", "gpt-4o-mini").unwrap().input, 0.15);
        // Provider-scoped catch-all: only for that provider.
        assert_eq!(t.price("azure", "my-deployment").unwrap().input, 9.0);
        assert!(t.price("openai", "my-deployment").is_none());
    }

    #[test]
    fn bad_entries_are_rejected_with_their_index() {
        let bad = |y: &str| {
            PriceTable::new(&PricingConfig {
                defaults: false,
                models: serde_yaml::from_str(y).unwrap(),
            })
            .err()
            .unwrap()
        };
        let (i, e) = bad("[{match: ok, input: 1, output: 1}, {match: 'a[', input: 1, output: 1}]");
        assert_eq!(i, 1);
        assert!(matches!(e, PricingError::BadPattern { .. }));
        let (_, e) = bad("[{match: m, input: -1, output: 1}]");
        assert_eq!(
            e,
            PricingError::BadPrice {
                pattern: "m".into(),
                field: "input"
            }
        );
    }

    #[test]
    fn no_defaults_means_only_config_entries() {
        let t = PriceTable::new(&PricingConfig {
            defaults: false,
            models: Vec::new(),
        })
        .unwrap();
        assert!(t.price("openai", "gpt-4o").is_none());
    }
}

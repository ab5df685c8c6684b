//! Token counts for calls whose provider reported no usage (a stream cut
//! short, a provider left at `stream_usage: leave`): OpenAI's own
//! encodings (`o200k_base`, `cl100k_base`, from the `tiktoken-rs` crate) for
//! the model families that use them. Other families keep the estimate of
//! four characters a token: Anthropic publishes no tokenizer for its
//! current models, and Gemini's is not shipped as a crate.
//!
//! An encoding costs about 41 MB of memory and 140 ms to load, and is needed
//! only by the rare call without usage. So it is loaded on first use, off
//! the data path (callers run [`estimate`] on a blocking thread), and dropped
//! again after [`IDLE`] without use, when the allocator is asked to hand the
//! memory back. Text beyond [`SAMPLE_BYTES`] is not encoded: its tokens are
//! the sample's tokens per character times its characters.
use std::{
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use super::Api;

/// How long an encoding stays loaded without a call to estimate.
pub const IDLE: Duration = Duration::from_secs(10 * 60);
/// Text encoded per side of a call; the rest is scaled from it.
pub const SAMPLE_BYTES: usize = 64 * 1024;
/// Largest request body kept after sending for an estimate of its input
/// (larger ones are estimated by characters).
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Text is encoded in pieces of at most this many bytes: BPE merging is
/// quadratic in the length of one pre-token, and a workload's text may be
/// one long run of letters.
const PIECE_BYTES: usize = 1024;

/// One of OpenAI's encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    O200k,
    Cl100k,
}

impl Encoding {
    /// The encoding of an OpenAI model family, when `model` (as requested or
    /// answered; an `org/` prefix, as OpenRouter writes it, is ignored) is one.
    pub fn for_model(api: Api, model: &str) -> Option<Self> {
        if api != Api::Openai {
            return None;
        }
        let m = model.strip_prefix("openai/").unwrap_or(model);
        const O200K: &[&str] = &[
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "gpt-oss",
            "gpt-realtime",
            "gpt-audio",
            "chatgpt-4o",
            "o1",
            "o3",
            "o4",
        ];
        const CL100K: &[&str] = &["gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada"];
        if O200K.iter().any(|p| m.starts_with(p)) {
            Some(Encoding::O200k)
        } else if CL100K.iter().any(|p| m.starts_with(p)) {
            Some(Encoding::Cl100k)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200k => "o200k_base",
            Encoding::Cl100k => "cl100k_base",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn load(self) -> Result<CoreBPE, String> {
        match self {
            Encoding::O200k => tiktoken_rs::o200k_base(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base(),
        }
        .map_err(|e| format!("loading the {} encoding: {e}", self.name()))
    }
}

/// What a call without usage showed of its text.
#[derive(Debug, Default)]
pub struct Texts {
    /// The request body as sent (JSON), when it was small enough to keep.
    pub request: Option<hyper::body::Bytes>,
    /// Characters of the request's text (all of it, not just a sample).
    pub input_chars: u64,
    /// The first `SAMPLE_BYTES` of the generated text.
    pub output: String,
    /// Characters of generated text (all of it).
    pub output_chars: u64,
}

/// Tokens counted with an encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Counts `texts` with `enc` (the process's shared, lazily loaded copy).
/// Blocking: up to a few milliseconds, 200 ms more when it loads.
/// None (the caller keeps its character estimate) when the request body
/// was not kept or the encoding cannot be loaded.
pub fn estimate(enc: Encoding, texts: &Texts) -> Option<Counted> {
    let body: Value = serde_json::from_slice(texts.request.as_deref()?).ok()?;
    let bpe = match SHARED.get(enc) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!("{e}; estimating by characters instead");
            return None;
        }
    };
    let mut input = String::new();
    super::walk_text(&body, &mut |s| push_sample(&mut input, s));
    // Chat messages cost a few tokens each beyond their text (role and
    // separators: 3 + 1 in OpenAI's published count) and 3 to prime the reply.
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| m.len() as u64);
    let framing = if messages > 0 { 4 * messages + 3 } else { 0 };
    Some(Counted {
        input_tokens: scaled(&bpe, &input, texts.input_chars) + framing,
        output_tokens: scaled(&bpe, &texts.output, texts.output_chars),
    })
}

/// Appends `s` to a sample, up to `SAMPLE_BYTES` (cut on a character boundary).
pub fn push_sample(sample: &mut String, s: &str) {
    let room = SAMPLE_BYTES.saturating_sub(sample.len());
    if room == 0 {
        return;
    }
    let mut end = s.len().min(room);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    sample.push_str(&s[..end]);
}

/// Tokens of `sample`, scaled to `total_chars` when the text was longer than it.
fn scaled(bpe: &CoreBPE, sample: &str, total_chars: u64) -> u64 {
    let tokens = count(bpe, sample);
    let sample_chars = sample.chars().count() as u64;
    if sample_chars == 0 || total_chars <= sample_chars {
        return tokens;
    }
    (tokens as u128 * total_chars as u128).div_ceil(sample_chars as u128) as u64
}

/// Tokens of `text`, encoded in pieces of at most `PIECE_BYTES`, each cut
/// after whitespace where the piece has any (so words stay whole).
fn count(bpe: &CoreBPE, text: &str) -> u64 {
    let mut rest = text;
    let mut n = 0;
    while !rest.is_empty() {
        let mut end = rest.len().min(PIECE_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end < rest.len()
            && let Some(ws) = rest[..end].rfind(char::is_whitespace).filter(|w| *w > 0)
        {
            end = ws;
        }
        n += bpe.encode_ordinary(&rest[..end]).len() as u64;
        rest = &rest[end..];
    }
    n
}

/// The process's loaded encodings.
static SHARED: LazyLock<Tokenizers> = LazyLock::new(|| Tokenizers::new(IDLE));

struct Loaded {
    bpe: Arc<CoreBPE>,
    last_used: Instant,
}

struct Slots {
    loaded: [Option<Loaded>; 2],
    /// A sweeper thread is running (it ends when nothing is loaded).
    sweeping: bool,
}

/// Encodings loaded on first use and dropped after `idle` without one.
struct Tokenizers {
    idle: Duration,
    slots: Mutex<Slots>,
}

impl Tokenizers {
    fn new(idle: Duration) -> Self {
        Self {
            idle,
            slots: Mutex::new(Slots {
                loaded: [None, None],
                sweeping: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&'static self, enc: Encoding) -> Result<Arc<CoreBPE>, String> {
        if let Some(l) = self.lock().loaded[enc.index()].as_mut() {
            l.last_used = Instant::now();
            return Ok(l.bpe.clone());
        }
        // Loaded without the lock held; a racing load's copy is dropped.
        let fresh = Arc::new(enc.load()?);
        tracing::info!(
            encoding = enc.name(),
            "loaded a tokenizer for a call without usage (dropped after {:?} without use)",
            self.idle
        );
        let mut slots = self.lock();
        let l = slots.loaded[enc.index()].get_or_insert(Loaded {
            bpe: fresh,
            last_used: Instant::now(),
        });
        l.last_used = Instant::now();
        let bpe = l.bpe.clone();
        if !slots.sweeping {
            slots.sweeping = true;
            drop(slots);
            let spawned = std::thread::Builder::new()
                .name("tokenizer-idle".into())
                .spawn(move || {
                    while self.sweep(Instant::now()) {
                        std::thread::sleep(self.idle.min(Duration::from_secs(60)));
                    }
                });
            if spawned.is_err() {
                self.lock().sweeping = false; // kept loaded; the next load tries again
            }
        }
        Ok(bpe)
    }

    /// Drops the encodings idle since `now - idle`; true while any remain
    /// (false also ends the sweeping, under the same lock a load takes).
    fn sweep(&self, now: Instant) -> bool {
        let mut dropped = Vec::new();
        let remaining = {
            let mut slots = self.lock();
            for slot in slots.loaded.iter_mut() {
                if slot
                    .as_ref()
                    .is_some_and(|l| now.saturating_duration_since(l.last_used) >= self.idle)
                {
                    dropped.extend(slot.take());
                }
            }
            let remaining = slots.loaded.iter().any(Option::is_some);
            slots.sweeping = remaining;
            remaining
        };
        if !dropped.is_empty() {
            drop(dropped);
            give_back_memory();
        }
        remaining
    }
}

/// Returns freed heap to the system: an encoding is ~200k small
/// allocations that the allocator otherwise keeps for reuse. The agent's
/// allocator is mimalloc (measured: 44.3 MiB loaded, the same after the
/// drop, 8.0 MiB after `mi_collect`); glibc's malloc is trimmed too, for
/// the library's other users (48.7 → 27.4 → 7.8 MiB).
fn give_back_memory() {
    // SAFETY: mi_collect frees only memory mimalloc holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o200k() -> Arc<CoreBPE> {
        SHARED.get(Encoding::O200k).unwrap()
    }

    #[test]
    fn model_families_map_to_their_encodings() {
        for (api, model, want) in [
            (Api::Openai, "gpt-4o-mini-2024-07-18", Some(Encoding::O200k)),
            (Api::Openai, "gpt-5-pro", Some(Encoding::O200k)),
            (Api::Openai, "o3-mini", Some(Encoding::O200k)),
            (Api::Openai, "openai/gpt-4.1", Some(Encoding::O200k)),
            (Api::Openai, "gpt-4-turbo", Some(Encoding::Cl100k)),
            (Api::Openai, "gpt-3.5-turbo", Some(Encoding::Cl100k)),
            (
                Api::Openai,
                "text-embedding-3-small",
                Some(Encoding::Cl100k),
            ),
            (Api::Openai, "mistral-large-latest", None),
            (Api::Openai, "anthropic/claude-sonnet-4", None),
            (Api::Anthropic, "gpt-4o", None),
            (Api::Gemini, "gemini-2.5-flash", None),
        ] {
            assert_eq!(Encoding::for_model(api, model), want, "{model}");
        }
    }

    #[test]
    fn counts_are_the_encodings_own() {
        let bpe = o200k();
        // "Hello" + " world": two tokens, where four characters a token says three.
        assert_eq!(count(&bpe, "Hello world"), 2);
        assert_eq!(count(&bpe, ""), 0);
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(100);
        assert_eq!(
            count(&bpe, &text),
            bpe.encode_ordinary(&text).len() as u64,
            "cutting after whitespace keeps every word whole"
        );
    }

    #[test]
    fn a_long_run_without_spaces_is_counted_in_pieces() {
        let bpe = o200k();
        let run = "x".repeat(SAMPLE_BYTES);
        let n = count(&bpe, &run);
        assert!(n > 0 && n <= run.len() as u64, "{n}");
        // Multi-byte characters are never cut.
        let wide = "é".repeat(3000);
        assert!(count(&bpe, &wide) > 0);
    }

    #[test]
    fn text_beyond_the_sample_is_scaled() {
        let bpe = o200k();
        let sentence = "Tokens of a long answer are scaled from its sample. ";
        let mut sample = String::new();
        let repeats = 2 * SAMPLE_BYTES / sentence.len();
        for _ in 0..repeats {
            push_sample(&mut sample, sentence);
        }
        assert_eq!(sample.len(), SAMPLE_BYTES);
        let total = (sentence.len() * repeats) as u64;
        let exact = count(&bpe, &sentence.repeat(repeats));
        let est = scaled(&bpe, &sample, total);
        let off = est.abs_diff(exact) as f64 / exact as f64;
        assert!(off < 0.01, "scaled {est} vs exact {exact}");
    }

    #[test]
    fn a_chat_request_and_its_answer_are_estimated() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello world"}]}"#;
        let texts = Texts {
            request: Some(hyper::body::Bytes::from_static(body)),
            input_chars: 20,
            output: "Hello world".into(),
            output_chars: 11,
        };
        let got = estimate(Encoding::O200k, &texts).unwrap();
        // "Be brief." is 3 tokens, "Hello world" 2; two messages frame 4 each, 3 prime the reply.
        assert_eq!(
            got,
            Counted {
                input_tokens: 3 + 2 + 8 + 3,
                output_tokens: 2
            }
        );
        let not_kept = Texts {
            request: None,
            ..texts
        };
        assert_eq!(estimate(Encoding::O200k, &not_kept), None);
    }

    #[test]
    fn an_idle_encoding_is_dropped() {
        let t: &'static Tokenizers =
            Box::leak(Box::new(Tokenizers::new(Duration::from_secs(3600))));
        t.get(Encoding::Cl100k).unwrap();
        assert!(t.sweep(Instant::now()), "used just now: kept");
        assert!(!t.sweep(Instant::now() + Duration::from_secs(3601)));
        assert!(t.lock().loaded.iter().all(Option::is_none));
        assert!(!t.lock().sweeping);
    }
}

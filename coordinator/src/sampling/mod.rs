//! Choosing the next token from logits: greedy, or temperature sampling restricted by min-p
//! (Nguyen et al. 2024, arXiv:2407.01082), top-k and top-p (nucleus, Holtzman et al. 2019,
//! arXiv:1904.09751), with the CTRL repetition penalty (Keskar et al. 2019, arXiv:1909.05858) as
//! Hugging Face applies it, OpenAI's presence and frequency penalties and `logit_bias`, and
//! `min_tokens` (stop tokens barred until that many were generated), in vLLM's order: stop
//! tokens barred, bias added, penalties, temperature, min-p, top-k, top-p. A seed makes runs
//! reproducible on the same kind of device. On a GPU the work over the whole vocabulary runs
//! there, a step's rows in one batch (`tensor.rs`): unrestricted draws use the Gumbel-max trick,
//! exact in distribution but not the host's draw for the same seed.

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::grammar::Constraint;

mod tensor;

pub use tensor::BatchRow;

/// Accepted repetition penalties: 1 is none; 100 either way already leaves no choice.
pub const REPETITION_PENALTY_RANGE: std::ops::RangeInclusive<f32> = 0.01..=100.0;

/// Accepted presence and frequency penalties, as OpenAI's.
pub const OPENAI_PENALTY_RANGE: std::ops::RangeInclusive<f32> = -2.0..=2.0;

/// Accepted `logit_bias` values, as OpenAI's.
pub const LOGIT_BIAS_RANGE: std::ops::RangeInclusive<f32> = -100.0..=100.0;

/// Sampling settings; `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: f32,
    /// Tokens whose probability is below `min_p` times the most likely one's are dropped.
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token generated so far (OpenAI).
    pub presence_penalty: f32,
    /// Subtracted once per time a token was generated so far (OpenAI).
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens.
    pub logit_bias: Vec<(u32, f32)>,
    /// Stop tokens cannot be drawn before this many tokens were generated.
    pub min_tokens: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks ranges once, with messages that say what to change.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1".to_string());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !OPENAI_PENALTY_RANGE.contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !LOGIT_BIAS_RANGE.contains(b))
        {
            return Err(format!(
                "logit_bias for token {t} must be in [-100, 100], got {b}"
            ));
        }
        // Dividing a logit by a tiny penalty overflows to infinity and the softmax to NaN.
        if !(REPETITION_PENALTY_RANGE.contains(&self.repetition_penalty)) {
            return Err(format!(
                "repetition_penalty must be in [{}, {}], got {}",
                REPETITION_PENALTY_RANGE.start(),
                REPETITION_PENALTY_RANGE.end(),
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Per-sequence sampler state (its random stream, and the grammar the answer must follow).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    constraint: Option<Constraint>,
    /// Tokens of the history before generation began (the prompt): presence and frequency
    /// penalties and `min_tokens` count only what follows.
    prompt_len: usize,
    /// Barred until `min_tokens` were generated.
    stop_tokens: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            constraint: None,
            prompt_len: 0,
            stop_tokens: Vec::new(),
        }
    }

    /// Every token drawn from now on must continue `constraint`'s grammar.
    pub fn constrained(mut self, constraint: Constraint) -> Self {
        self.constraint = Some(constraint);
        self
    }

    /// The grammar the answer follows is complete: nothing more may be generated.
    pub fn grammar_finished(&self) -> bool {
        self.constraint.as_ref().is_some_and(Constraint::finished)
    }

    /// A sampler for a sequence whose history starts with a `prompt_len`-token prompt and
    /// which ends at `stop_tokens`.
    pub fn for_sequence(params: SamplingParams, prompt_len: usize, stop_tokens: Vec<u32>) -> Self {
        Self {
            prompt_len,
            stop_tokens,
            ..Self::new(params)
        }
    }

    /// Whether this step needs the host's full processing: a grammar, a bias, OpenAI's
    /// penalties, min-p or barred stop tokens (the device handles the repetition penalty, temperature and
    /// top-k / top-p only).
    fn needs_host(&self, history: &[u32]) -> bool {
        let p = &self.params;
        self.constraint.is_some()
            || !p.logit_bias.is_empty()
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || (p.min_p > 0.0 && p.temperature > 0.0)
            || self.barring_stops(history)
    }

    fn barring_stops(&self, history: &[u32]) -> bool {
        history.len().saturating_sub(self.prompt_len) < self.params.min_tokens
            && !self.stop_tokens.is_empty()
    }

    /// Picks the next token from one row of logits on the host; `history` is every token so far
    /// (prompt and generated), used by the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut logits = logits.to_vec();
        if self.barring_stops(history) {
            for &t in &self.stop_tokens {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for &(t, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in history.get(self.prompt_len..).unwrap_or_default() {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= presence + frequency * n as f32;
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(&logits);
        }
        let mut order: Vec<(u32, f32)> = (0..).zip(logits).collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.min_p > 0.0
            && let Some(&(_, max)) = order.first()
        {
            // p / p_max >= min_p, in logits at this temperature.
            let floor = max + self.params.temperature * self.params.min_p.ln();
            order.retain(|&(_, l)| l >= floor);
        }
        if let Some(k) = self.params.top_k {
            order.truncate(k.max(1));
        }
        // The whole (top-k) list always holds its nucleus; the vocabulary is never empty.
        self.draw(&order, Head::Whole).unwrap_or(0)
    }

    /// Draws from the top-p nucleus of `sorted` (descending logits, ties to the lower id) at the
    /// sampler's temperature. `None`, drawing nothing, when `sorted` is only the head of the
    /// distribution and does not reach the nucleus's mass.
    fn draw(&mut self, sorted: &[(u32, f32)], head: Head) -> Option<u32> {
        let &(_, max) = sorted.first()?;
        let t = self.params.temperature;
        let mut probs: Vec<f32> = sorted.iter().map(|&(_, l)| ((l - max) / t).exp()).collect();
        let sum = match head {
            Head::Whole => probs.iter().sum(),
            Head::Of(total) => total,
        };
        probs.iter_mut().for_each(|p| *p /= sum);
        // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
        let mut mass = 0.0;
        let mut keep = None;
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= self.params.top_p {
                keep = Some(i + 1);
                break;
            }
        }
        let keep = match (keep, head) {
            (Some(k), _) => k,
            (None, Head::Whole) => probs.len(),
            (None, Head::Of(_)) => return None,
        };
        let kept: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * kept;
        for (&(id, _), p) in sorted.iter().zip(&probs[..keep]) {
            r -= p;
            if r <= 0.0 {
                return Some(id);
            }
        }
        Some(sorted[keep - 1].0)
    }
}

/// How much of the distribution a sorted candidate list is.
#[derive(Debug, Clone, Copy)]
enum Head {
    /// All of it (after top-k): normalise over the list.
    Whole,
    /// The largest logits only, with the denominator over the whole vocabulary.
    Of(f32),
}

/// Log-probabilities of one step, as the model gave them (log-softmax of the raw logits, before
/// any penalty, bias or temperature: vLLM's default).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's.
    pub logprob: f32,
    /// The chosen token's place among all tokens, from 1 (vLLM's `rank`: one more than the
    /// number of tokens more likely than it).
    pub rank: usize,
    /// The most likely tokens, most likely first (ties to the lower id).
    pub top: Vec<(u32, f32)>,
}

/// Most `top_logprobs` a request may ask for, as OpenAI's.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// [`TokenLogprobs`] of `token` and the `top` most likely tokens of a row of logits.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>()
        .ln() as f32;
    let lp = |l: f32| l - max - log_sum;
    let mut best: Vec<(u32, f32)> = (0..).zip(logits.iter().copied()).collect();
    let top = top.min(best.len());
    if top > 0 {
        best.select_nth_unstable_by(top - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    best.truncate(top);
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let chosen = logits.get(token as usize).copied();
    TokenLogprobs {
        logprob: chosen.map_or(f32::NEG_INFINITY, lp),
        rank: chosen.map_or(logits.len() + 1, |c| {
            1 + logits.iter().filter(|&&l| l > c).count()
        }),
        top: best.into_iter().map(|(t, l)| (t, lp(l))).collect(),
    }
}

/// Index of the largest logit; ties go to the lower index (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests;

//! The timed loops of `coordinator bench`: greedy decode at a batch size, one long prefill, and
//! one MoE layer's expert call, each on whatever [`Engine`] or [`Experts`] it is given, so the
//! in-process and the cluster configurations run exactly the same code.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use omnishard_model::{
    CallContext, Experts, KvCache, LogitsFor, Positions, Routing, SequenceInput,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::Engine;
use crate::engine::EngineError;
use crate::sampling::{BatchRow, Sampler, SamplingParams};

/// Deterministic prompt ids in the vocabulary.
pub fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32)
        .collect()
}

/// Every row's greedy token, chosen where the logits lie, the rows together as the server
/// draws a step's (on a GPU, only the ids come back).
fn argmax(logits: &[Tensor]) -> Result<Vec<u32>, EngineError> {
    let mut samplers: Vec<Sampler> = logits
        .iter()
        .map(|_| Sampler::new(SamplingParams::default()))
        .collect();
    let mut rows: Vec<BatchRow<'_>> = samplers
        .iter_mut()
        .zip(logits)
        .map(|(sampler, logits)| BatchRow {
            sampler,
            logits,
            history: &[],
        })
        .collect();
    Ok(Sampler::sample_batch(&mut rows)
        .into_iter()
        .collect::<candle_core::Result<Vec<u32>>>()
        .map_err(omnishard_model::ModelError::from)?)
}

/// Decode tokens per second of `batch` sequences decoding together (greedy), after a
/// `prompt_len`-token prompt each and `warmup` untimed steps; `steps` timed steps. `timed` is
/// called once, as the timed steps begin (to drop what the warm-up left in a profile).
pub fn decode_tok_s(
    engine: &Engine,
    batch: usize,
    prompt_len: usize,
    warmup: usize,
    steps: usize,
    mut timed: impl FnMut(),
) -> Result<f64, EngineError> {
    let vocab = engine.config().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|b| prompt(prompt_len, vocab, b)).collect();
    let mut caches: Vec<KvCache> = (0..batch).map(|_| KvCache::new()).collect();
    let mut inputs: Vec<SequenceInput> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| SequenceInput {
            tokens: p,
            positions: Positions::text(0, p.len()),
            cache,
        })
        .collect();
    let logits = engine.forward(&mut inputs, LogitsFor::Last, &CallContext::default())?;
    let mut next = argmax(&logits)?;
    let mut started = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            timed();
            started = Instant::now();
        }
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut inputs: Vec<SequenceInput> = tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| {
                let pos = cache.seq_len() as u32;
                SequenceInput {
                    tokens: t,
                    positions: Positions::text(pos, 1),
                    cache,
                }
            })
            .collect();
        let logits = engine.forward(&mut inputs, LogitsFor::Last, &CallContext::default())?;
        next = argmax(&logits)?;
    }
    Ok((batch * steps) as f64 / started.elapsed().as_secs_f64())
}

/// Prefill tokens per second of one `len`-token prompt (the best of `rounds`).
pub fn prefill_tok_s(engine: &Engine, len: usize, rounds: usize) -> Result<f64, EngineError> {
    let tokens = prompt(len, engine.config().vocab_size, 7);
    let mut best = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let mut cache = KvCache::new();
        let mut input = [SequenceInput {
            tokens: &tokens,
            positions: Positions::text(0, len),
            cache: &mut cache,
        }];
        let started = Instant::now();
        let logits = engine.forward(&mut input, LogitsFor::Last, &CallContext::default())?;
        // A GPU may still be computing when forward returns (nothing in a prefill waits for it
        // when the routing stays on the device): the prefill is done when its logits are.
        if let Some(last) = logits.last() {
            last.device()
                .synchronize()
                .map_err(omnishard_model::ModelError::from)?;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(len as f64 / best)
}

/// Per-call latencies in microseconds of `a` and `b` on one decode token of `layer` (random
/// hidden state, top-k random distinct experts), in pairs: each pair calls both with the same
/// routing, in alternating order, so load drift on a shared machine hits both alike and the
/// per-pair difference isolates what `b` adds. `calls` pairs after 3 untimed ones.
pub fn paired_layer_calls_us(
    a: &dyn Experts,
    b: &dyn Experts,
    layer: usize,
    cfg: &omnishard_proto::ModelConfig,
    dtype: DType,
    calls: usize,
) -> Result<(Vec<f64>, Vec<f64>), EngineError> {
    let (hidden, top_k) = (cfg.hidden_size, cfg.num_experts_per_tok);
    let mut rng = StdRng::seed_from_u64(layer as u64);
    let xs: Vec<f32> = (0..hidden).map(|_| rng.random_range(-1.0..1.0)).collect();
    let xs = Tensor::from_vec(xs, (1, hidden), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(omnishard_model::ModelError::from)?;
    let mut ids: Vec<u32> = (0..cfg.num_experts as u32).collect();
    let ctx = CallContext::default();
    let time = |experts: &dyn Experts, routing: &Routing| -> Result<f64, EngineError> {
        let started = Instant::now();
        experts
            .forward(layer, &xs, routing, &ctx)
            .map_err(|source| omnishard_model::ModelError::Experts { layer, source })?;
        Ok(started.elapsed().as_secs_f64() * 1e6)
    };
    let (mut ta, mut tb) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for call in 0..calls + 3 {
        // A fresh choice of experts each pair, as real decoding makes.
        for i in 0..top_k {
            let j = rng.random_range(i..ids.len());
            ids.swap(i, j);
        }
        let routing = Routing {
            top_k,
            ids: ids[..top_k].to_vec(),
            weights: vec![1.0 / top_k as f32; top_k],
        };
        let (x, y) = if call % 2 == 0 {
            let x = time(a, &routing)?;
            (x, time(b, &routing)?)
        } else {
            let y = time(b, &routing)?;
            (time(a, &routing)?, y)
        };
        if call >= 3 {
            ta.push(x);
            tb.push(y);
        }
    }
    Ok((ta, tb))
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

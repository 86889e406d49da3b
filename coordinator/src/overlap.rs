//! Micro-batch overlap for expert nodes: a step's sequences split into two micro-batches that run
//! through the model on two threads, so one's attention (and router) computes while the other's
//! expert calls are on the wire, layer after layer — the ping-pong of MegaScale-Infer (Zhu et
//! al. 2025, arXiv:2504.02263) and SGLang's two-batch overlap. Each sequence owns its KV cache,
//! so the halves share nothing but the read-only weights; the split is by sequence, balanced by
//! tokens. Output equals the unsplit step wherever a token's numbers do not depend on which
//! other tokens share its batch: omnishard's bf16 CPU kernels without AMX (tests/tests/overlap.rs,
//! with real node processes). candle's f32 gemm, AMX tiles and the GPU's GEMM/GEMV choice depend
//! on the batch's size, so there the logits move by rounding, as any change of batch
//! composition under continuous batching already makes them.

use candle_core::Tensor;
use omnishard_model::{CallContext, LogitsFor, MediaSpan, Model, ModelError, SequenceInput};

/// Where to cut `batch` into two micro-batches of about equal tokens: the first sequence of the
/// second half, always leaving at least one sequence on each side (`batch.len() >= 2`).
pub fn split_point(tokens: &[usize]) -> usize {
    let total: usize = tokens.iter().sum();
    let mut acc = 0;
    let mut cut = 0;
    for &t in tokens {
        if 2 * (acc + t) > total + t {
            break;
        }
        acc += t;
        cut += 1;
    }
    cut.clamp(1, tokens.len().saturating_sub(1).max(1))
}

/// Runs `batch` as two overlapped micro-batches; the logits come back in `batch` order.
pub fn forward(
    model: &Model,
    batch: &mut [SequenceInput<'_>],
    which: LogitsFor,
    ctx: &CallContext,
    media: &[Vec<MediaSpan>],
) -> Result<Vec<Tensor>, ModelError> {
    let lens: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
    let cut = split_point(&lens);
    let (first, second) = batch.split_at_mut(cut);
    let (media_a, media_b) = media.split_at(cut.min(media.len()));
    let _span =
        tracing::trace_span!("overlap", first = first.len(), second = second.len()).entered();
    let (a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| model.forward_media(second, which, ctx, media_b));
        let a = model.forward_media(first, which, ctx, media_a);
        (a, b.join())
    });
    // A panic in the second micro-batch is a bug, not an input error: pass it on as such.
    let b = b.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let mut logits = a?;
    logits.extend(b?);
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::split_point;

    #[test]
    fn splits_balance_tokens_and_keep_both_halves() {
        assert_eq!(split_point(&[1, 1]), 1);
        assert_eq!(split_point(&[1, 1, 1, 1]), 2);
        assert_eq!(split_point(&[1, 1, 1, 1, 1]), 3);
        assert_eq!(split_point(&[100, 1, 1, 1]), 1);
        assert_eq!(split_point(&[1, 1, 1, 100]), 3);
        assert_eq!(split_point(&[5, 5, 10]), 2);
    }
}

//! The interface of next-token sampling on a device: what the coordinator's sampler asks of one
//! row of logits and what comes back. The GPU kernel is `cuda::sample_row` (`sample.cuh`); on
//! other devices it answers `None` and the host samples.

/// The most candidates the device hands back for the host to finish top-k / top-p on.
pub const DEVICE_CANDIDATES: usize = 1024;

/// One row's sampling settings, as the device applies them.
#[derive(Debug, Clone, Copy)]
pub struct RowSampling<'a> {
    /// Tokens to which the repetition penalty applies (repeats allowed); empty for none.
    pub penalized: &'a [u32],
    pub penalty: f32,
    /// 0 for greedy.
    pub temperature: f32,
    /// How many of the largest logits to hand back (at most [`DEVICE_CANDIDATES`]).
    pub top: usize,
    /// With a key, draw from the whole softmax on the device (Gumbel-max) instead of handing
    /// back candidates; the key makes the draw reproducible.
    pub gumbel_key: Option<u64>,
}

/// What the device made of one row.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceDraw {
    /// The token: greedy, or a Gumbel-max draw.
    Token(u32),
    /// The `top` largest penalised logits (more where they tie at the boundary), sorted by
    /// descending logit then ascending id, with the softmax denominator over the whole vocabulary
    /// (`sum exp((z - max) / T)`, `max` the first logit).
    Candidates { sorted: Vec<(u32, f32)>, total: f32 },
    /// More than [`DEVICE_CANDIDATES`] logits tie at the boundary: the host must sample.
    TooManyTies,
}

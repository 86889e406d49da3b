//! `expert-node`: serves a partition of a checkpoint's experts over gRPC.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("expert-node is not implemented yet")
}

//! What rank 0 sends the other ranks before each forward: the step's sequence chunks, exactly
//! as it scheduled them, so that every rank builds the same batch. Encoded as little-endian
//! `u32` words.

use crate::batch::SeqChunk;
use crate::error::{EngineError, Result};

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanChunk {
    /// Tokens computed this step.
    pub tokens: Vec<u32>,
    /// Position of the first.
    pub start_pos: u32,
    /// The sequence's KV blocks.
    pub block_table: Vec<u32>,
    /// Whether rank 0 samples from its last token.
    pub want_logits: bool,
}

/// A message from rank 0 to the other ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPlan {
    /// Run one forward over these chunks.
    Step(Vec<PlanChunk>),
    /// The group is shutting down.
    Stop,
    /// No step: rank 0 is idle and checks that every rank answers (a barrier follows).
    Ping,
}

impl StepPlan {
    /// The plan of a step over `chunks`.
    pub fn of(chunks: &[SeqChunk<'_>]) -> StepPlan {
        StepPlan::Step(
            chunks
                .iter()
                .map(|c| PlanChunk {
                    tokens: c.tokens.to_vec(),
                    start_pos: c.start_pos as u32,
                    block_table: c.block_table.to_vec(),
                    want_logits: c.want_logits,
                })
                .collect(),
        )
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w: Vec<u32> = Vec::new();
        match self {
            StepPlan::Stop => w.push(0),
            StepPlan::Ping => w.push(2),
            StepPlan::Step(chunks) => {
                w.push(1);
                w.push(chunks.len() as u32);
                for c in chunks {
                    w.push(c.tokens.len() as u32);
                    w.extend(&c.tokens);
                    w.push(c.start_pos);
                    w.push(c.block_table.len() as u32);
                    w.extend(&c.block_table);
                    w.push(u32::from(c.want_logits));
                }
            }
        }
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Reads the wire form, refusing anything malformed.
    pub fn decode(bytes: &[u8]) -> Result<StepPlan> {
        let bad = || EngineError::Collective("malformed step plan from rank 0".into());
        if !bytes.len().is_multiple_of(4) {
            return Err(bad());
        }
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut it = words.into_iter();
        let mut next = || it.next().ok_or_else(bad);
        let plan = match next()? {
            0 => StepPlan::Stop,
            1 => {
                let n = next()? as usize;
                let mut chunks = Vec::with_capacity(n.min(bytes.len() / 16));
                for _ in 0..n {
                    let k = next()? as usize;
                    let tokens = (0..k).map(|_| next()).collect::<Result<Vec<_>>>()?;
                    let start_pos = next()?;
                    let b = next()? as usize;
                    let block_table = (0..b).map(|_| next()).collect::<Result<Vec<_>>>()?;
                    let want_logits = next()? != 0;
                    chunks.push(PlanChunk {
                        tokens,
                        start_pos,
                        block_table,
                        want_logits,
                    });
                }
                StepPlan::Step(chunks)
            }
            2 => StepPlan::Ping,
            _ => return Err(bad()),
        };
        if next().is_ok() {
            return Err(bad());
        }
        Ok(plan)
    }
}

impl PlanChunk {
    /// As the batch builder takes it.
    pub fn as_chunk(&self) -> SeqChunk<'_> {
        SeqChunk {
            tokens: &self.tokens,
            start_pos: self.start_pos as usize,
            block_table: &self.block_table,
            want_logits: self.want_logits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_round_trip_and_garbage_is_refused() {
        let plan = StepPlan::Step(vec![
            PlanChunk {
                tokens: vec![5, 6, 7],
                start_pos: 0,
                block_table: vec![3],
                want_logits: true,
            },
            PlanChunk {
                tokens: vec![9],
                start_pos: 40,
                block_table: vec![1, 2, 4],
                want_logits: false,
            },
        ]);
        assert_eq!(StepPlan::decode(&plan.encode()).unwrap(), plan);
        assert_eq!(
            StepPlan::decode(&StepPlan::Stop.encode()).unwrap(),
            StepPlan::Stop
        );
        let enc = plan.encode();
        assert!(StepPlan::decode(&enc[..enc.len() - 4]).is_err());
        assert!(StepPlan::decode(&[enc.as_slice(), &[0, 0, 0, 0]].concat()).is_err());
        assert!(StepPlan::decode(&[7, 0, 0, 0]).is_err());
        assert!(StepPlan::decode(&[1, 0, 0]).is_err());
    }
}

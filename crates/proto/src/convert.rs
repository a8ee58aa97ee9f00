//! The one conversion between each wire type of `openinfer.worker.v1` and its `core` twin.
//! The router converts to the wire when it dispatches; the worker converts back when a
//! sequence arrives.

use openinfer_core::{FinishReason, SamplingParams, StoppingParams};

use crate::worker::v1 as wire;

impl From<SamplingParams> for wire::SamplingParams {
    fn from(s: SamplingParams) -> Self {
        wire::SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            seed: s.seed,
        }
    }
}

impl From<wire::SamplingParams> for SamplingParams {
    fn from(s: wire::SamplingParams) -> Self {
        SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            frequency_penalty: s.frequency_penalty,
            presence_penalty: s.presence_penalty,
            seed: s.seed,
        }
    }
}

impl From<StoppingParams> for wire::StoppingParams {
    fn from(s: StoppingParams) -> Self {
        wire::StoppingParams {
            max_new_tokens: s.max_new_tokens,
            stop: s.stop,
            ignore_eos: s.ignore_eos,
        }
    }
}

impl From<wire::StoppingParams> for StoppingParams {
    fn from(s: wire::StoppingParams) -> Self {
        StoppingParams {
            max_new_tokens: s.max_new_tokens,
            stop: s.stop,
            ignore_eos: s.ignore_eos,
        }
    }
}

impl From<FinishReason> for wire::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Length => wire::FinishReason::Length,
            FinishReason::Stop => wire::FinishReason::Stop,
            FinishReason::Eos => wire::FinishReason::Eos,
            FinishReason::Cancelled => wire::FinishReason::Cancelled,
            FinishReason::Error => wire::FinishReason::Error,
            FinishReason::Preempted => wire::FinishReason::Preempted,
            FinishReason::Rejected => wire::FinishReason::Rejected,
        }
    }
}

/// A wire finish reason with no `core` meaning: unset, or a number this build does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("finish reason {0} is not one this router knows")]
pub struct UnknownFinishReason(pub i32);

impl TryFrom<wire::FinishReason> for FinishReason {
    type Error = UnknownFinishReason;
    fn try_from(r: wire::FinishReason) -> Result<Self, UnknownFinishReason> {
        Ok(match r {
            wire::FinishReason::Length => FinishReason::Length,
            wire::FinishReason::Stop => FinishReason::Stop,
            wire::FinishReason::Eos => FinishReason::Eos,
            wire::FinishReason::Cancelled => FinishReason::Cancelled,
            wire::FinishReason::Error => FinishReason::Error,
            wire::FinishReason::Preempted => FinishReason::Preempted,
            wire::FinishReason::Rejected => FinishReason::Rejected,
            wire::FinishReason::Unspecified => return Err(UnknownFinishReason(r as i32)),
        })
    }
}

impl wire::SequenceFinished {
    /// Why the sequence ended.
    pub fn finish_reason(&self) -> Result<FinishReason, UnknownFinishReason> {
        wire::FinishReason::try_from(self.reason)
            .map_err(|_| UnknownFinishReason(self.reason))
            .and_then(FinishReason::try_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finish_reason_goes_to_the_wire_and_back() {
        let ended = |reason| wire::SequenceFinished {
            reason,
            ..Default::default()
        };
        for r in FinishReason::ALL {
            let on_wire = wire::FinishReason::from(r) as i32;
            assert_eq!(ended(on_wire).finish_reason(), Ok(r));
        }
        assert_eq!(ended(0).finish_reason(), Err(UnknownFinishReason(0)));
        assert_eq!(ended(99).finish_reason(), Err(UnknownFinishReason(99)));
    }

    #[test]
    fn parameters_go_to_the_wire_and_back_unchanged() {
        let s = SamplingParams {
            temperature: Some(0.7),
            top_p: Some(0.9),
            top_k: Some(40),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
            frequency_penalty: Some(0.5),
            presence_penalty: Some(-0.5),
            seed: Some(7),
        };
        assert_eq!(
            SamplingParams::from(wire::SamplingParams::from(s.clone())),
            s
        );
        let st = StoppingParams {
            max_new_tokens: 12,
            stop: vec!["\n\n".into()],
            ignore_eos: true,
        };
        assert_eq!(
            StoppingParams::from(wire::StoppingParams::from(st.clone())),
            st
        );
    }
}

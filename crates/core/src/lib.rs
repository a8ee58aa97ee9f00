//! Shared types of OpenInferencev2: sequence ids, sampling and stopping parameters, finish
//! reasons and the error codes every crate maps its errors onto.

pub mod error;
pub mod params;
pub mod prefix;
pub mod units;

pub use error::{bounded, echo, Code, ErrorCode};
pub use params::{
    check_length, check_top_logprobs, with_bos, FinishReason, InvalidField, SamplingParams,
    SequenceId, StoppingParams, MAX_TOP_LOGPROBS,
};

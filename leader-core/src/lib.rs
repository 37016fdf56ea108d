#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(clippy::unwrap_used)]

mod backoff;
mod builder;
mod clock;
mod config;
mod driver;
mod election;
mod error;
mod event;
mod lead;
mod machinery;
mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use async_trait::async_trait;
pub use builder::{ElectionBuilder, MAX_NAME_LEN, MAX_TTL, MAX_VALUE_LEN, MIN_TTL};
pub use config::Config;
pub use driver::{Candidate, CandidateInfo, Driver, Grant, LeaderInfo};
pub use election::{Election, Status, Term};
pub use error::{BoxError, Error, Result};
pub use event::{Event, EventStream, LossReason};
pub use machinery::ErrorChain;
pub use tokio_util::sync::CancellationToken;

#[cfg(all(test, feature = "testing"))]
mod lead_tests;
#[cfg(all(test, feature = "testing"))]
mod safety_tests;
#[cfg(all(test, feature = "testing"))]
mod tests;

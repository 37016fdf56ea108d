#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

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
pub mod notices;
mod settings;
mod telemetry;
mod term;
#[cfg(feature = "testing")]
pub mod testing;
mod url;

pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use builder::ElectionBuilder;
pub use clock::BootInstant;
pub use config::Config;
pub use driver::{Candidate, CandidateInfo, Driver, Grant, LeaderInfo};
pub use election::{Election, Status};
pub use error::{BoxError, Error, ErrorChain, Result};
pub use event::{Event, EventStream, LossReason};
pub use settings::{MAX_NAME_LEN, MAX_TTL, MAX_VALUE_LEN, MIN_TTL, default_safety_margin};
pub use term::Term;
pub use tokio_util::sync::CancellationToken;
pub use url::{StoreUrl, TlsFiles, redact_url, redact_urls};

#[cfg(all(test, feature = "testing"))]
mod lead_tests;
#[cfg(all(test, feature = "testing"))]
mod safety_tests;
#[cfg(all(test, feature = "testing"))]
mod tests;

//! cradle's domain model: the [`Instance`], its OS parameters in three
//! visibilities, and [`Secret`], the wrapper that makes a leak take an explicit
//! call. No I/O happens here.

#![forbid(unsafe_code)]

pub mod agent;
pub mod answers;
pub mod api;
mod instance;
pub mod job;
pub mod machine;
pub mod maintenance;
pub mod personalization;
mod secret;
pub mod tags;

pub use instance::{
    HostAddr, ImdsTokens, Instance, MAX_PASSWORD, MAX_USER_DATA, Os, OsParams, RANDOM_SEED_LEN,
    State, Visibility, allocate_link_local, is_interface_name,
};
pub use secret::{REDACTED, Secret};

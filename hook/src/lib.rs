//! nix-tier's build hook (`nix-tier-hook`) and the state it shares with `nix-tier`.
//!
//! Nix runs the program named by `build-hook` and asks it, for every derivation it is about to
//! build, whether to build it now ([`protocol`]). The hook relays the question to Nix's own
//! `build-remote` when remote builders are configured ([`relay`]), and otherwise admits the build
//! only while its tier has a free slot and the memory budget holds ([`dispatch`], with the
//! policy in `nix_tier_model::admission`). Admissions are recorded machine-wide ([`state`]) and
//! end when Nix releases the build's output locks ([`output_locks`]).

pub mod broker;
pub mod config;
pub mod dispatch;
pub mod history;
pub mod nix_version;
pub mod output_locks;
pub mod privileges;
pub mod procfs;
pub mod protocol;
pub mod relay;
pub mod state;
pub mod status;
pub mod watch;
pub mod wire;

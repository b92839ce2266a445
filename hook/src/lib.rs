//! nix-tier's build hook (`nix-tier-hook`) and the state it shares with `nix-tier`.
//!
//! Nix runs the program named by `build-hook` and asks it, for every derivation it is about to
//! build, whether to build it now ([`protocol`]). The hook relays the question to Nix's own
//! `build-remote` when remote builders are configured ([`relay`]), and otherwise admits the build
//! only while the machine's broker says so ([`dispatch`], a client of [`broker`], which holds the
//! lease table of `nix_tier_model::leases` and the policy of `nix_tier_model::admission`). The
//! broker's watcher ([`watch`]) bounds each admitted build and ends its lease when the build's
//! processes are gone; `nix-tier status` reads the broker's snapshot ([`state`]).

pub mod broker;
pub mod config;
pub mod dispatch;
pub mod history;
pub mod nix_version;
pub mod output_locks;
pub mod plan;
pub mod privileges;
pub mod proc_events;
pub mod procfs;
pub mod protocol;
pub mod relay;
pub mod report;
pub mod state;
pub mod status;
pub mod store_db;
pub mod watch;
pub mod wire;

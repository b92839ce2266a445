//! The nix-tier Nix plugin: `builtins.hardwareProfile` and `builtins.optimizeFor`.
//!
//! Nix `dlopen`s the library built from this crate (`plugin-files` in nix.conf). The C++ shim in
//! `cpp-shim/` registers the builtins and converts values; this crate makes every decision, using
//! the shared model in `nix-tier-model`. Data crosses the boundary as JSON strings, the facts
//! read from each derivation as a compact text, and each plan as the Nix code that applies it.

mod apply;
mod ffi;
mod hardware_profile;
mod optimize_for;

use std::fmt;
use std::panic::{self, AssertUnwindSafe};

/// An error reported to Nix as an evaluation error; its text is the whole message the user sees.
#[derive(Debug)]
pub struct PluginError(String);

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for PluginError {
    fn from(error: E) -> Self {
        PluginError(error.to_string())
    }
}

/// Runs `call`, turning a panic into an error so that no unwinding ever reaches C++.
fn catch_panics<T>(call: impl FnOnce() -> Result<T, PluginError>) -> Result<T, PluginError> {
    panic::catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(PluginError(format!(
            "nix-tier plugin: internal error ({what}); please report it"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_that_name_the_cause() {
        let result: Result<(), _> = catch_panics(|| panic!("boom at {}", 42));
        let message = result.unwrap_err().to_string();
        assert!(message.contains("internal error (boom at 42)"), "{message}");
        assert_eq!(catch_panics(|| Ok(7)).unwrap(), 7);
    }
}

//! Shared model of nix-tier.

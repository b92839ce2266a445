//! `nix-tier`: the command line of nix-tier, hardware-aware Nix builds.
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function.

mod profile;

use std::error::Error;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// What a subcommand returns: `Err` is printed on stderr and exits with status 1.
type CommandResult = Result<(), Box<dyn Error>>;

/// Hardware-aware Nix builds.
#[derive(Parser)]
#[command(name = "nix-tier", version)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
enum Command {
    Profile(profile::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Profile(args) => profile::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nix-tier: {error}");
            ExitCode::FAILURE
        }
    }
}

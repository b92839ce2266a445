//! `nix-tier`: the command line of nix-tier, hardware-aware Nix builds.
//!
//! Each subcommand lives in its own module under `cli/` with an `Args` struct and a `run`
//! function; the build hook's machinery is the `nix_tier_hook` library.

mod cli;

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
    Profile(cli::profile::Args),
    Status(cli::status::Args),
    Explain(cli::explain::Args),
    History(cli::history::Args),
    Simulate(cli::simulate::Args),
    Report(cli::report::Args),
    Tune(cli::tune::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Profile(args) => cli::profile::run(&args),
        Command::Status(args) => cli::status::run(&args),
        Command::Explain(args) => cli::explain::run(&args),
        Command::History(args) => cli::history::run(&args),
        Command::Simulate(args) => cli::simulate::run(&args),
        Command::Report(args) => cli::report::run(&args),
        Command::Tune(args) => cli::tune::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nix-tier: {error}");
            ExitCode::FAILURE
        }
    }
}

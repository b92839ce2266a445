# nix-tier: the command line (`nix-tier`) and the build hook (`nix-tier-hook`).
#
# Neither needs Nix's headers or a particular Nix version: they talk to Nix through the build
# hook protocol and read .drv files, /proc and the state directory.
#
# With `runTests = true` the build also runs every test that works inside the Nix build
# sandbox (flake output checks.<system>.tests): the whole workspace except
#   - nix-tier-plugin (needs Nix's headers; built by nix/package.nix, tested end to end), and
#   - nix-tier-tests (runs real nix-instantiate, nix-build and nix-daemon processes against the
#     plugin; run it with ./scripts/test on Debian bookworm, whose Nix 2.8 it targets).
# Tests that need root or a writable cgroup hierarchy (cgroups/tests/kernel.rs,
# hook/tests/privileges.rs) notice they have neither and skip themselves.
{ lib
, rustPlatform
, pkg-config
, sqlite
, src ? import ./source.nix
, runTests ? false
}:

rustPlatform.buildRustPackage {
  pname = if runTests then "nix-tier-tests" else "nix-tier";
  version = (builtins.fromTOML (builtins.readFile ../Cargo.toml)).workspace.package.version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ pkg-config ];
  # rusqlite links the system's libsqlite3 (the build history).
  buildInputs = [ sqlite ];

  cargoBuildFlags = [ "-p" "nix-tier-hook" ];
  doCheck = runTests;
  cargoTestFlags = [ "--workspace" "--exclude" "nix-tier-plugin" "--exclude" "nix-tier-tests" ];

  meta = {
    description = "Hardware-aware Nix builds: the nix-tier command line and build hook";
    license = [ lib.licenses.mit lib.licenses.asl20 ];
    mainProgram = "nix-tier";
    platforms = lib.platforms.linux;
  };
}

# nix-tier-plugin: the Nix plugin with builtins.hardwareProfile and builtins.optimizeFor.
#
# A Nix plugin is C++ loaded into Nix's own process, so it must be built against the exact Nix
# that loads it: pass that Nix as `nix` (the NixOS and home-manager modules pass
# `config.nix.package`). plugin/build.rs finds it through pkg-config (`nix-expr`) and its
# headers in `${nix.dev}/include`.
#
# The output is what `plugin-files` names, the loader `lib/libnix_tier_loader.so`
# (loader/nix-tier-loader.cc, no Nix symbols), with the build beside it in
# `lib/nix-tier-plugin/<Nix version>/`. The loader loads the build for the running Nix and
# otherwise warns once, so a Nix upgrade never breaks Nix. For several Nix versions, join the
# packages: `symlinkJoin { name = "nix-tier-plugin"; paths = map (nix: nix-tier-plugin.override
# { inherit nix; }) [ nixA nixB ]; }` carries a build for each behind one loader.
#
# Supported: Nix 2.8, and Nix 2.24 onwards (not Lix). cpp-shim/nix-compat.hh holds every Nix API
# difference; for any other version the build stops at once with a message (rather than at the
# compat header's #error deep inside cargo's output). nix/lib.nix's pluginSupportsNix says the
# same, and the modules use it to leave the plugin out by default.
{ lib
, rustPlatform
, pkg-config
, nix
, boehmgc
, boost
, nlohmann_json
, src ? import ./source.nix
}:

let
  tierLib = import ./lib.nix;
  nixVersion = lib.getVersion nix;
  nixDev = lib.getDev nix;
  supported = tierLib.pluginSupportsNix nixVersion;
in
rustPlatform.buildRustPackage {
  pname = "nix-tier-plugin";
  version = (builtins.fromTOML (builtins.readFile ../Cargo.toml)).workspace.package.version;
  inherit src;
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ pkg-config ];
  # Nix's headers include Boehm GC's, Boost's and nlohmann_json's.
  buildInputs = [ nixDev boehmgc boost nlohmann_json ];

  # plugin/build.rs looks for nix/eval.hh here first.
  NIX_TIER_NIX_INCLUDE = "${nixDev}/include";

  cargoBuildFlags = [ "-p" "nix-tier-plugin" ];
  # Its behaviour is tested end to end against a real Nix (nix-tier-tests), not here.
  doCheck = false;

  preConfigure = lib.optionalString (!supported) ''
    echo "nix-tier-plugin: cannot be built against Nix ${nixVersion}: cpp-shim/nix-compat.hh supports Nix 2.8 and Nix 2.24 onwards (not Lix)." >&2
    echo "Build it against a supported Nix that will also load it (config.nix.package)," >&2
    echo "or leave the plugin out (services.nix-tier.plugin.enable = false)." >&2
    exit 1
  '';

  # The build goes under the version the running Nix reports (what the loader looks for);
  # the loader is plain C++ compiled here.
  installPhase = ''
    runHook preInstall
    version=$(${lib.getBin nix}/bin/nix-instantiate --version | awk '{print $NF}')
    so=$(find target -path '*/release/libnix_tier_plugin.so' -print -quit)
    install -Dm755 "$so" "$out/lib/nix-tier-plugin/$version/libnix_tier_plugin.so"
    $CXX -std=c++17 -O2 -Wall -Wextra -Werror -fPIC -shared -o "$out/lib/libnix_tier_loader.so" loader/nix-tier-loader.cc
    runHook postInstall
  '';

  passthru = {
    inherit nix;
    pluginFile = "lib/libnix_tier_loader.so";
  };

  meta = {
    description = "Nix plugin with builtins.hardwareProfile and builtins.optimizeFor, built for Nix ${nixVersion}";
    license = [ lib.licenses.mit lib.licenses.asl20 ];
    platforms = lib.platforms.linux;
  };
}

# A stand-in for nixpkgs' `pkgs` as far as nix-tier's modules, package expressions and the fixtures use it
# (see ./stub-lib.nix). `callPackage` really calls the package function, with the arguments it
# asks for taken from here, and `rustPlatform.buildRustPackage` returns the attributes it was
# given as a fake derivation, so tests can look at what a package expression asks for without
# building anything. `nixVersion` sets the version of the stub Nix.
{ nixVersion ? "2.8.0" }:
let
  stubLib = import ./stub-lib.nix;
  hash = name: builtins.substring 0 32 (builtins.hashString "sha256" name);
  drv = name: attrs: attrs // {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${hash name}-${name}";
  };
  withOutputs = name: attrs: drv name (attrs // { dev = drv "${name}-dev" { }; out = drv name { }; });

  lib = stubLib // {
    getDev = p: p.dev or p;
    getBin = p: p.bin or p.out or p;
    licenses = { mit = { spdxId = "MIT"; }; asl20 = { spdxId = "Apache-2.0"; }; };
    platforms = { linux = [ "x86_64-linux" "aarch64-linux" ]; };
  };

  self = {
    inherit lib;
    callPackage = fn: overrides:
      let
        f = if builtins.isFunction fn then fn else import fn;
        wanted = builtins.functionArgs f;
        given = builtins.intersectAttrs wanted self // overrides;
      in
      f given;
    rustPlatform.buildRustPackage = attrs: drv "${attrs.pname}-${attrs.version}" { buildRustPackageArgs = attrs; } // { inherit (attrs) pname version; };
    writeText = name: text: drv name { inherit text; };
    runCommand = name: env: script: drv name { inherit env script; };
    nix = withOutputs "nix-${nixVersion}" { version = nixVersion; pname = "nix"; };
    pkg-config = drv "pkg-config" { };
    # nixos/modules/services/system/nix-daemon.nix: the unprivileged daemon's wrapper.
    nix-daemon-nswrapper = drv "nix-daemon-nswrapper" { };
    sqlite = withOutputs "sqlite" { };
    boehmgc = withOutputs "boehm-gc" { };
    boost = withOutputs "boost" { };
    nlohmann_json = drv "nlohmann_json" { };
  };
in
self
